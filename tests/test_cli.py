"""The `augsvc` command line as a user runs it: real subprocesses on real JPEG folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augsvc.cli import COMMANDS

pytestmark = pytest.mark.timeout(180)


def augsvc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "augsvc", *args], capture_output=True,
                          text=True, timeout=170, cwd=cwd)


def test_help_lists_and_explains_every_command() -> None:
    top = augsvc("--help")
    assert top.returncode == 0
    version = augsvc("--version")
    assert version.returncode == 0 and version.stdout.startswith("augsvc ")
    for name in COMMANDS:
        shown = name.replace("_", "-")
        assert shown in top.stdout
        sub = augsvc(shown, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "usage: augsvc " + shown in sub.stdout
        # every option has a help text
        assert "--" in sub.stdout and " --help" in sub.stdout


def test_stats_then_preview_with_reference(jpeg_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "photos"
    shutil.copytree(jpeg_folder, data)
    out = augsvc("stats", str(data), "--no-progress")
    assert out.returncode == 0, out.stderr
    saved = json.loads((data / "augsvc-stats.json").read_text())
    assert len(saved["mean"]) == 3 and len(saved["eigvals"]) == 3
    assert "augsvc-stats.json" in out.stdout

    grid = tmp_path / "grid.png"
    out = augsvc("preview", str(data), "--out", str(grid), "--images", "3", "--draws", "2",
                 "--reference", "--set", "size=64", "--set", "stats=\"dataset\"")
    assert out.returncode == 0, out.stderr
    with Image.open(grid) as im:
        pixels = np.asarray(im.convert("RGB"))
    # 1 original + 2 draws x (pipeline, numpy, difference) columns of max(64, 162) px, 3 rows
    # of 64 px cells and 6 caption lines of 11 px, 4 px gaps, a title line
    assert pixels.shape == (14 + 3 * (64 + 66 + 4) + 4, 7 * 166 + 4, 3)
    x0, y0 = 4 + 166, 18
    cell = pixels[y0:y0 + 64, x0:x0 + 64].astype(int)  # row 0, draw 0 (pipeline)
    ref = pixels[y0:y0 + 64, x0 + 166:x0 + 166 + 64].astype(int)  # row 0, draw 0 (numpy)
    diff = pixels[y0:y0 + 64, x0 + 332:x0 + 332 + 64].astype(int)  # row 0, draw 0 difference
    assert cell.std() > 5  # an image, not a blank
    assert np.abs(cell - ref).mean() < 12  # the oracle draws the same augmentation
    assert diff.max() > 0 and (diff[..., 0] == diff[..., 1]).all()  # a grey difference map
    assert "numpy reference and difference" in out.stdout


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path: Path, jpeg_folder: Path) -> None:
    cases = [
        (("stats", str(tmp_path / "missing")), "no such dataset"),
        (("preview", str(jpeg_folder), "--set", "crop=zoom"), "AugmentSpec.crop"),
        (("preview", str(jpeg_folder), "--spec", "{oops"), "AugmentSpec.<spec>"),
        (("serve", "--dataset", f"x={tmp_path / 'missing'}", "--port", "0"),
         "no such dataset"),
        (("serve", "--dataset", f"x={jpeg_folder}", "--max-connection-age", "-1"),
         "max_connection_age must be in [0, 2000000] seconds"),
    ]
    for args, words in cases:
        out = augsvc(*args)
        assert out.returncode != 0, args
        assert words in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr, (args, out.stderr)


def test_commands_without_their_extra_say_what_to_install(monkeypatch, capsys) -> None:
    import importlib

    cli_main = importlib.import_module("augsvc.cli.main")  # augsvc.cli.main is also a function
    for name in cli_main.NEEDS:
        shown = name.replace("_", "-")
        assert "pip install 'augsvc[server]'" in augsvc(shown, "--help").stdout, shown
    # what an install without the server extra sees: the command's modules are missing
    monkeypatch.setitem(cli_main.NEEDS, "stats", ("PIL", "augsvc_no_such_module.sub"))
    assert cli_main.main(["stats", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert "augsvc stats: needs augsvc_no_such_module.sub" in err
    assert "pip install 'augsvc[server]'" in err
