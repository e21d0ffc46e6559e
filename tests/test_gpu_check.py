"""`make gpu-check` rehearsed on the CPU (`--device cpu --small`), so that the first run on a
GPU host, with minutes of device time, does not fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_gpu_check_rehearsal(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path / "out"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu",
                           "--small"], capture_output=True, text=True, env=env, timeout=380)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert result["pytest"]["exit_code"] == 0 and result["pytest"]["skipped"] > 0
    assert result["kernel"] == {"note": "not run: needs a GPU"}
    assert set(result["bench"]) == {"bench-w1", "bench-w2"}
    first = result["bench"]["bench-w1"]["img_s"]
    assert {"a", "a0", "b", "b'", "b''", "c"} <= set(first)
    assert all(v > 0 for v in first.values())
    assert set(result["bench"]["bench-w2"]["img_s"]) == {"b", "b'", "b''"}
    assert "b/a(1 worker)" in result["bench"]["bench-w2"]["ratios"]
    table = (tmp_path / "out" / "gpu-check.txt").read_text()
    assert done.stdout.rstrip().endswith(table.rstrip())  # the table comes last
    for name in ("pytest-gpu.log", "bench-w1.log", "bench-w2.log"):
        assert (tmp_path / "out" / name).is_file()
