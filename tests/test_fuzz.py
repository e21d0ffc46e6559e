"""The fuzz script, shortened (500 requests): a real `augsvc serve` survives hostile requests.

The full figure (10k requests) is `python scripts/fuzz_server.py`; docs/hardening.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serverproc import REPO_ROOT


@pytest.mark.timeout(300)
def test_500_fuzzed_requests_leave_the_server_healthy(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "fuzz_server.py"),
                           "--requests", "500", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=280)
    print(proc.stdout)  # the table, shown by pytest -s or on failure
    result = json.loads(out.read_text())
    assert sum(sum(c.values()) for c in result["codes"].values()) == 500
    assert set(result["codes"]) == {"bytes", "fields", "names", "near", "cancel"}
    assert result["codes"]["near"].get("OK", 0) > 0  # some requests went all the way
    assert all(result["checks"].values()), proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
