"""`augsvc bench` runs end to end and writes its table, JSON and plot (figures not asserted:
speed lives in the benchmark's output, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(300)


def test_bench_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "augsvc", "bench", "--duration", "1", "--images", "16",
         "--epoch-images", "64", "--batch-size", "8", "--size", "64", "--threads", "1",
         "--skip", "d", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")],
        capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["figures"]) == {"a", "a0", "b", "b'", "b''", "c"}
    for fig in result["figures"].values():
        assert fig["img_s"] > 0 and fig["mb_s"] > 0 and fig["p50_ms"] <= fig["p99_ms"]
    assert result["ratios"]["b/a"] > 0 and result["ratios"]["a/d"] is None
    assert 0 < result["ratios"]["b/c"] < 1  # the pipeline-bound service against the ceiling
    assert "ratio b/a" in out.stdout and "(c) bare gRPC chunk stream" in out.stdout
    with Image.open(tmp_path / "b.png") as im:
        assert im.width > 300 and im.height > 200
