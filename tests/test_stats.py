"""RGB statistics: exact accumulation, eigenbasis, file format, presets, CLI, progress bar."""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augsvc.cli import stats as stats_command
from augsvc.cli.progress import progress
from augsvc.core import stats
from augsvc.core.draws import draw_params
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import IMAGENET, DatasetStats, StatsError
from augsvc.engine.dataset import open_dataset
from augsvc.engine.statistics import compute_stats, load_stats, stats_file

SIZES = [(200, 150), (150, 200), (256, 256)]
TRUE_MEAN = np.array([0.5, 0.45, 0.55])
TRUE_EIGVALS = np.array([0.02, 0.005, 0.001])
QUANT_VAR = 1 / 12 / 255**2  # variance added by rounding to 8 bits


def _known_images(root: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """PNGs whose pixels have sample covariance exactly V diag(TRUE_EIGVALS) V^T before rounding.

    z is uniform (bounded), then whitened with its own sample moments, so the drawn
    pixels have exactly the target mean and covariance; bounded z keeps every value
    inside (0, 255): nothing is clipped. Returns (eigvecs V, cov, the uint8 images).
    """
    rng = np.random.default_rng(0)
    eigvecs, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    cov = eigvecs @ np.diag(TRUE_EIGVALS) @ eigvecs.T
    n = sum(h * w for h, w in SIZES)
    z = rng.uniform(-np.sqrt(3), np.sqrt(3), (n, 3))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T, bias=True))).T
    x = TRUE_MEAN + z @ np.linalg.cholesky(cov).T
    levels = np.rint(x * 255)
    assert levels.min() > 0 and levels.max() < 255
    images, start = [], 0
    (root / "only").mkdir(parents=True)
    for k, (h, w) in enumerate(SIZES):
        img = levels[start:start + h * w].reshape(h, w, 3).astype(np.uint8)
        Image.fromarray(img).save(root / "only" / f"{k}.png")
        images.append(img)
        start += h * w
    return eigvecs, cov, images


def test_known_covariance_is_recovered(tmp_path: Path) -> None:
    eigvecs, cov, images = _known_images(tmp_path)
    result = compute_stats(open_dataset(tmp_path))
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255
    assert result.num_images == 3 and result.num_pixels == len(pixels)

    # against the stored pixels: exact accumulation, so float64 rounding only
    np.testing.assert_allclose(result.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(result.cov, np.cov(pixels.T, bias=True), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(result.std, pixels.std(axis=0), rtol=1e-9)

    # against the generating distribution: rounding adds ~QUANT_VAR (1.3e-6) on the
    # diagonal and cross terms of ~sqrt(0.02 * QUANT_VAR / n) = 5e-7; allow 3e-6
    np.testing.assert_allclose(result.mean, TRUE_MEAN, atol=2e-5)
    np.testing.assert_allclose(result.cov, cov + QUANT_VAR * np.eye(3), atol=3e-6)
    np.testing.assert_allclose(result.eigvals, TRUE_EIGVALS + QUANT_VAR, atol=3e-6)
    # eigenvectors move by about |dC| / eigengap = 3e-6 / 0.004 < 1e-3
    aligned = eigvecs * np.sign(np.sum(eigvecs * result.eigvecs, axis=0))
    np.testing.assert_allclose(result.eigvecs, aligned, atol=2e-3)
    # conventions: columns are eigenvectors, descending, sign rule
    np.testing.assert_allclose(result.cov @ result.eigvecs, result.eigvecs * result.eigvals,
                               atol=1e-12)
    assert np.all(np.diff(result.eigvals) < 0)
    pivot = np.argmax(np.abs(result.eigvecs), axis=0)
    assert np.all(result.eigvecs[pivot, [0, 1, 2]] > 0)
    assert result.pca_basis() == (result.eigvecs, result.eigvals)


def test_subset_and_undecodable_images(
    tmp_dataset, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_dataset(per_class=4)
    index = open_dataset(root)
    a = compute_stats(index, max_images=3, seed=1)
    b = compute_stats(index, max_images=3, seed=1)
    assert a.num_images == 3 and np.array_equal(a.cov, b.cov)
    assert compute_stats(index, max_images=100).num_images == 8
    with pytest.raises(StatsError, match="max_images"):
        compute_stats(index, max_images=0)

    good = (root / "class_01" / "img_0000.jpg").read_bytes()
    broken = root / "class_01" / "cut.jpg"
    broken.write_bytes(good[: len(good) // 2])  # header intact: indexed, but won't decode
    index = open_dataset(root)
    assert len(index) == 9
    with caplog.at_level(logging.WARNING, logger="augsvc.engine.statistics"):
        result = compute_stats(index)
    assert result.num_images == 8
    assert str(broken) in caplog.text


def test_nothing_decodable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="JPEG")
    (tmp_path / "c" / "cut.jpg").write_bytes(buf.getvalue()[:-200])
    with pytest.raises(StatsError, match=r"no image .* could be decoded"):
        compute_stats(open_dataset(tmp_path))


def test_save_load_round_trip(tmp_path: Path) -> None:
    original = DatasetStats.from_moments(
        mean=[0.1, 0.2, 0.3], cov=[[0.04, 0.01, 0.0], [0.01, 0.03, 0.0], [0.0, 0.0, 0.02]],
        num_images=5, num_pixels=1000, source="unit test",
    )
    path = original.save(tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert data["format"] == "augsvc-stats/1"
    again = stats.load(path)
    for name in ("mean", "std", "cov", "eigvals", "eigvecs"):
        assert np.array_equal(getattr(again, name), getattr(original, name))
    assert (again.num_images, again.num_pixels, again.source) == (5, 1000, "unit test")
    assert not again.mean.flags.writeable


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "augsvc-stats/2"}, "expected format"),
    ({"extra": 1}, r"unknown keys \['extra'\]"),
    ({"mean": [0.1, 0.2]}, r"mean: expected finite numbers of shape \(3,\)"),
    ({"cov": [[1, 0, 0], [0, 1, 0], [0, 0, float("nan")]]}, "cov: expected finite"),
    ({"num_pixels": -1}, "num_pixels"),
])
def test_from_dict_rejects_bad_files(change: dict, message: str) -> None:
    data = {**IMAGENET.to_dict(), **change}
    with pytest.raises(StatsError, match=message):
        DatasetStats.from_dict(data)


def test_imagenet_preset_is_self_consistent() -> None:
    v, lam = IMAGENET.pca_basis()
    np.testing.assert_allclose(IMAGENET.mean, [0.485, 0.456, 0.406])
    np.testing.assert_allclose(IMAGENET.std, [0.229, 0.224, 0.225])
    np.testing.assert_allclose(lam, [0.2175, 0.0188, 0.0045])
    assert v[0].tolist() == [-0.5675, 0.7192, 0.4009]  # rows as published; columns are vectors
    # published to 4 decimals: entries off by <= 5e-5, so dot products by < 3e-4
    np.testing.assert_allclose(v.T @ v, np.eye(3), atol=3e-4)
    # cov @ v_j = lambda_j v_j up to the same rounding (scaled by lambda_0)
    np.testing.assert_allclose(IMAGENET.cov @ v, v * lam, atol=lam[0] * 3e-4)
    np.testing.assert_allclose(IMAGENET.cov, IMAGENET.cov.T)
    # the luminance direction comes first
    assert np.allclose(np.abs(v[:, 0]), 1 / np.sqrt(3), atol=0.02)
    # and it plugs into the sampler: offset = V @ (alpha * lambda) * 255
    params = draw_params(AugmentSpec(), 0, 0, np.arange(4), np.full(4, 375), np.full(4, 500),
                         pca_basis=IMAGENET.pca_basis())
    expected = (params.pca_alpha.astype(np.float64) * lam) @ v.T * 255
    np.testing.assert_allclose(params.rgb_offset, expected, rtol=1e-5, atol=1e-4)


def test_stats_file_and_load_stats(tmp_dataset) -> None:
    root = tmp_dataset()
    index = open_dataset(root)
    assert stats_file(index) == root / "augsvc-stats.json"
    manifest = root / "val.csv"
    manifest.write_text("path,label\nclass_00/img_0000.jpg,0\n")
    assert stats_file(open_dataset(manifest)) == root / "val.csv.augsvc-stats.json"

    assert load_stats(index, "imagenet") is IMAGENET
    with pytest.raises(StatsError, match=r"run `augsvc stats .*`"):
        load_stats(index, "dataset")
    computed = compute_stats(index)
    computed.save(stats_file(index))
    assert np.array_equal(load_stats(index, "dataset").cov, computed.cov)
    with pytest.raises(StatsError, match="unknown stats source"):
        load_stats(index, "cifar")


# ---------------------------------------------------------------- standard errors


def _image_moments(rng: np.random.Generator, n: int, pixels: int = 64) -> stats.PixelMoments:
    """n synthetic images: each has its own mean colour (the image-to-image spread that a
    sample of images misses) plus pixel noise, on the 0..255 scale."""
    image_means = 128 + rng.normal(size=(n, 3)) @ np.diag([30.0, 12.0, 4.0])
    x = image_means[:, None, :] + rng.normal(scale=10.0, size=(n, pixels, 3))
    return stats.PixelMoments(x.sum(axis=1), np.einsum("npi,npj->nij", x, x),
                              np.full(n, float(pixels)))


def test_bootstrap_standard_error_matches_the_spread_over_fresh_samples() -> None:
    """The bootstrap SE from one sample of 60 images is close to the true SE: the spread
    of the eigenvalues over 400 independent samples of 60 images."""
    rng = np.random.default_rng(1)
    truth = np.std([_image_moments(rng, 60).stats("x").eigvals for _ in range(400)], axis=0)
    boot = np.mean([_image_moments(rng, 60).eigvals_stderr(200, seed=s) for s in range(6)],
                   axis=0)
    np.testing.assert_allclose(boot, truth, rtol=0.35)
    pixel_level = truth[0] / np.sqrt(64)  # what resampling pixels, not images, would miss
    assert boot[0] > 3 * pixel_level


def test_standard_error_is_deterministic_and_zero_without_spread() -> None:
    m = _image_moments(np.random.default_rng(2), 10)
    np.testing.assert_array_equal(m.eigvals_stderr(50, seed=3), m.eigvals_stderr(50, seed=3))
    assert not np.array_equal(m.eigvals_stderr(50, seed=3), m.eigvals_stderr(50, seed=4))
    same = stats.PixelMoments(np.repeat(m.sums[:1], 5, 0), np.repeat(m.products[:1], 5, 0),
                              np.repeat(m.pixels[:1], 5))
    np.testing.assert_allclose(same.eigvals_stderr(50), 0, atol=1e-15)
    np.testing.assert_array_equal(stats.PixelMoments(m.sums[:1], m.products[:1],
                                                     m.pixels[:1]).eigvals_stderr(), 0)


# ---------------------------------------------------------------- CLI


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="augsvc")
    stats_command.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_writes_stats_and_summary(tmp_dataset, tmp_path: Path, capsys) -> None:
    root = tmp_dataset()
    args = _cli().parse_args(["stats", str(root), "--no-progress"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    written = stats.load(root / "augsvc-stats.json")
    assert written.num_images == 6
    for word in ("mean", "std", "eigvals", "eigvecs", "images", str(root / "augsvc-stats.json")):
        assert word in out

    assert "stderr" in out and "bootstrap over 6 images" in out

    target = tmp_path / "elsewhere.json"
    args = _cli().parse_args(["stats", str(root), "--out", str(target), "--max-images", "2",
                              "--seed", "3", "--no-progress"])
    assert args.run(args) == 0
    assert stats.load(target).num_images == 2


def test_cli_sample_is_deterministic_and_reports_standard_errors(tmp_dataset, tmp_path: Path,
                                                                 capsys) -> None:
    root = tmp_dataset(per_class=5)
    outputs = []
    for name in ("a", "b"):
        args = _cli().parse_args(["stats", str(root), "--sample", "4", "--seed", "2",
                                  "--out", str(tmp_path / f"{name}.json"), "--no-progress"])
        assert args.run(args) == 0
        outputs.append(capsys.readouterr().out)
    a, b = (stats.load(tmp_path / f"{n}.json") for n in "ab")
    assert a.num_images == 4 and a.to_dict() == b.to_dict()
    line = next(ln for ln in outputs[0].splitlines() if ln.startswith("stderr"))
    values = [float(v) for v in line.split()[1:4]]
    assert all(v > 0 for v in values) and "bootstrap over 4 images, 200 resamples" in line
    assert outputs[0].replace("a.json", "b.json") == outputs[1]  # the same numbers


def test_cli_help_and_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli().parse_args(["stats", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("PATH", "--out", "--sample", "--max-images", "--seed", "--no-progress"):
        assert option in text
    with pytest.raises(SystemExit):
        _cli().parse_args(["stats", str(tmp_path), "--max-images", "0"])
    args = _cli().parse_args(["stats", str(tmp_path / "missing")])
    assert args.run(args) == 1
    assert "no such dataset" in capsys.readouterr().err


# ---------------------------------------------------------------- progress bar


def test_progress_bar() -> None:
    quiet = io.StringIO()
    assert list(progress(range(5), stream=quiet)) == list(range(5))  # not a TTY: silent
    assert quiet.getvalue() == ""

    log = io.StringIO()
    assert list(progress(range(5), desc="work", enabled=True, stream=log)) == list(range(5))
    assert log.getvalue().startswith("work: 5/5 100% |") and log.getvalue().endswith("\n")

    cut = io.StringIO()
    for k in progress(iter(range(100)), total=100, enabled=True, stream=cut):
        if k == 9:
            break
    assert "9/100" in cut.getvalue()  # items finished, drawn when the loop is left

    unknown = io.StringIO()
    list(progress(iter(range(3)), enabled=True, stream=unknown))
    assert unknown.getvalue().startswith("3 [0:00")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    list(progress(range(3), desc="t", stream=tty))
    assert tty.getvalue().startswith("\rt: 3/3") and tty.getvalue().endswith("\n")
