"""The colour plugin (`augsvc.engine.kernels`) against the numpy oracle (`augsvc.core.reference`).

A real DALI pipeline runs `kernels.color` on batches of uint8 HWC images of several
sizes (1x1 and odd sizes included) with per-sample parameters. Every output pixel
must lie within 1 uint8 level of the oracle (the contract) and, tighter, within
0.5 + ROUND_TOL (rounding to nearest, so a truncating or biased kernel fails too).
Edge cases: grey, black and white pixels, primaries/secondaries, hues at the 0/1
wrap with shifts crossing it both ways, exponents 0.25 and 4, offsets past 0 and 255.
The build cache, its lock and the error messages are tested with a stubbed compiler.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types
from support import requires_gpu

from augsvc.core import reference as ref
from augsvc.engine import kernels

IDENTITY = np.array([0, 1, 1, 0, 1, 1, 0, 0, 0, 0], dtype=np.float32)
# float32 kernel vs float64 oracle: rounding to nearest leaves at most 0.5 level plus this
ROUND_TOL = 0.01
SIZES = [(1, 1), (1, 7), (7, 1), (3, 5), (17, 31), (64, 48), (101, 67), (300, 301)]


@pytest.fixture(scope="module", autouse=True)
def plugin() -> Path:
    return kernels.load()


def run_color(images: list[np.ndarray], params: np.ndarray, device: str) -> list[np.ndarray]:
    """One batch through a DALI pipeline holding only `kernels.color`."""

    @pipeline_def(
        batch_size=len(images),
        num_threads=2,
        device_id=0 if device == "gpu" else None,
        exec_dynamic=True,
        prefetch_queue_depth=1,
    )
    def graph():
        x = fn.external_source(
            source=lambda: images, batch=True, layout="HWC", dtype=types.UINT8, ndim=3
        )
        p = fn.external_source(source=lambda: params, batch=True, dtype=types.FLOAT, ndim=1)
        return kernels.color(x.gpu() if device == "gpu" else x, p, device)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    if device == "gpu":
        out = out.as_cpu()
    assert out.layout() == "HWC"
    return [np.array(out[i]) for i in range(len(images))]


def random_params(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 10) float32 drawn over the ranges of DESIGN.md (offsets ~ N(0, 8) levels)."""
    return np.column_stack(
        [
            rng.uniform(-0.1, 0.1, n),
            np.exp(rng.uniform(np.log(0.25), np.log(4), n)),
            rng.uniform(0.7, 1.4, n),
            rng.uniform(-0.1, 0.1, n),
            np.exp(rng.uniform(np.log(0.25), np.log(4), n)),
            rng.uniform(0.7, 1.4, n),
            rng.uniform(-0.1, 0.1, n),
            rng.normal(0, 8, (n, 3)),
        ]
    ).astype(np.float32)


def edge_pixels() -> np.ndarray:
    """(1, N, 3) uint8: greys, primaries/secondaries, hues next to the 0/1 wrap, near-greys."""
    px = [
        (0, 0, 0), (1, 1, 1), (128, 128, 128), (254, 254, 254), (255, 255, 255),
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
        (128, 0, 0), (0, 1, 0), (1, 0, 1),
        (255, 0, 1), (255, 1, 0), (255, 0, 40), (255, 40, 0), (200, 0, 199), (200, 199, 0),
        (128, 128, 129), (200, 201, 200), (3, 2, 2), (255, 254, 254),
    ]  # fmt: skip
    return np.array(px, dtype=np.uint8)[None]


def edge_params() -> np.ndarray:
    """Parameter vectors hitting the clips, the hue wrap both ways and the extreme exponents."""
    rows = [
        IDENTITY,
        [0.1, 1, 1, 0, 1, 1, 0, 0, 0, 0],  # hue near 1 wraps up past 1
        [-0.1, 1, 1, 0, 1, 1, 0, 0, 0, 0],  # hue near 0 wraps down below 0
        [-1e-7, 1, 1, 0, 1, 1, 0, 0, 0, 0],  # tiny negative shift of H = 0
        [0.5, 1, 1, 0, 1, 1, 0, 0, 0, 0],
        [-0.5, 1, 1, 0, 1, 1, 0, 0, 0, 0],
        [0.0, 0.25, 1, 0, 0.25, 1, 0, 0, 0, 0],  # exponents at the low end
        [0.0, 4, 1, 0, 4, 1, 0, 0, 0, 0],  # and at the high end
        [0.03, 0.25, 1.4, 0.1, 4, 0.7, -0.1, 0, 0, 0],
        [-0.07, 4, 0.7, -0.1, 0.25, 1.4, 0.1, 0, 0, 0],
        [0.0, 1, 1, 0.1, 1, 1, 0, 0, 0, 0],  # greys get S' = 0.1 at H = 0 (reddish)
        [0.0, 1, 1.4, 0, 1, 1.4, 0.1, 0, 0, 0],  # S and V clipped at 1
        [0.0, 1, 0.7, -0.1, 1, 0.7, -0.1, 0, 0, 0],  # S and V clipped at 0
        [0.0, 1, 1, 0, 1, 1, 0, 30, -30, 0.5],  # offsets past 255 and below 0
        [0.09, 2, 1.2, 0.05, 0.5, 0.9, 0.02, -300, 300, -2.5],  # offsets swamp everything
    ]
    return np.array(rows, dtype=np.float32)


def spec_end_params() -> np.ndarray:
    """The ends of the spec's ranges (exponents 1/16 and 16, scales 0 and 16, shifts +-1,
    hue shifts +-0.5), and exponents past the CPU kernel's fast path (it then runs the exact
    per-pixel code)."""
    rows = [
        [0.5, 1 / 16, 1, 0, 1 / 16, 1, 0, 0, 0, 0],
        [-0.5, 16, 1, 0, 16, 1, 0, 0, 0, 0],
        [0.25, 16, 16, 0, 1 / 16, 16, 0, 0, 0, 0],
        [-0.25, 1 / 16, 16, -1, 16, 0, 1, 0, 0, 0],
        [0.1, 3.7, 0.05, 0.97, 0.3, 1, -0.02, 100, -100, 0.4],
        [0.07, 1.0001, 1, 0, 0.9999, 1, 0, 0.5, -0.5, 0],  # exponents next to 1
        [0.03, 100, 1.1, 0, 0.5, 1, 0, 0, 0, 0],  # past the fast path: S
        [0.03, 1.3, 1, 0, 70, 1, 0, 1, 2, 3],  # and V
    ]
    return np.array(rows, dtype=np.float32)


def wide_random_params(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 10) float32 drawn over the whole range the spec accepts (AugmentSpec.validate)."""
    return np.column_stack(
        [
            rng.uniform(-0.5, 0.5, n),
            np.exp(rng.uniform(np.log(1 / 16), np.log(16), n)),
            rng.uniform(0, 16, n),
            rng.uniform(-1, 1, n),
            np.exp(rng.uniform(np.log(1 / 16), np.log(16), n)),
            rng.uniform(0, 16, n),
            rng.uniform(-1, 1, n),
            rng.normal(0, 30, (n, 3)),
        ]
    ).astype(np.float32)


def level_pixels() -> np.ndarray:
    """(256, 16, 3) uint8: for every level v = max(R, G, B), greys, near-greys (S near 0),
    saturated primaries and secondaries, and hues on both sides of the 0/1 wrap."""
    v = np.arange(256)
    lo, half, zero, one = np.maximum(v - 1, 0), v // 2, 0 * v, np.minimum(v, 1)
    px = [
        (v, v, v), (v, lo, lo), (lo, v, v), (v, v, lo), (v, lo, v),
        (v, zero, zero), (zero, v, zero), (zero, zero, v), (v, v, zero), (zero, v, v),
        (v, zero, v), (v, zero, one), (v, one, zero), (v, half, zero), (v, zero, half),
        (half, zero, v),
    ]  # fmt: skip
    return np.stack([np.stack(rgb, axis=-1) for rgb in px], axis=1).astype(np.uint8)


def all_colours(step: int = 4) -> np.ndarray:
    """(L, L*L, 3) uint8 grid of RGB levels (0..255 in `step`s, plus 1, 254, 255)."""
    levels = np.unique(np.r_[np.arange(0, 256, step), 1, 254, 255]).astype(np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1)
    return grid.reshape(len(levels), -1, 3)


def check(images: list[np.ndarray], params: np.ndarray, out: list[np.ndarray]) -> float:
    """Assert the contract sample by sample; return the max |out - oracle| in levels."""
    worst = 0.0
    for i, (im, o) in enumerate(zip(images, out, strict=True)):
        assert o.shape == im.shape and o.dtype == np.uint8, f"sample {i}"
        expect = ref.color(im, params[i].astype(np.float64))
        err = np.abs(o.astype(np.float64) - expect)
        bad = np.argwhere(err > 1.0)
        assert bad.size == 0, (
            f"sample {i}, params {params[i].tolist()}: {len(bad)} pixels off by more than 1 "
            f"level, first at {bad[0].tolist()}: in {im[tuple(bad[0][:2])].tolist()} "
            f"out {o[tuple(bad[0][:2])].tolist()} oracle {expect[tuple(bad[0][:2])].tolist()}"
        )
        assert err.max() <= 0.5 + ROUND_TOL, (
            f"sample {i}: off by {err.max():.4f} levels, not rounded to nearest"
        )
        worst = max(worst, float(err.max()))
    return worst


def random_batch(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    return images, random_params(rng, len(images))


def edge_batch() -> tuple[list[np.ndarray], np.ndarray]:
    params = edge_params()
    px = edge_pixels()
    # alternate row and column images so both strides are exercised
    images = [px if i % 2 == 0 else px.transpose(1, 0, 2).copy() for i in range(len(params))]
    return images, params


def grid_batch() -> tuple[list[np.ndarray], np.ndarray]:
    params = np.vstack([IDENTITY, random_params(np.random.default_rng(11), 3)])
    return [all_colours()] * len(params), params


def spec_end_batch() -> tuple[list[np.ndarray], np.ndarray]:
    params = spec_end_params()
    return [all_colours(step=8)] * len(params), params


def level_batch() -> tuple[list[np.ndarray], np.ndarray]:
    params = np.vstack([edge_params(), spec_end_params(),
                        wide_random_params(np.random.default_rng(5), 8)])
    return [level_pixels()] * len(params), params


def wide_random_batch(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    return images, wide_random_params(rng, len(images))


BATCHES = {
    "random0": lambda: random_batch(0),
    "random1": lambda: random_batch(1),
    "random2": lambda: random_batch(2),
    "edges": edge_batch,
    "colour_grid": grid_batch,
    "spec_ends": spec_end_batch,
    "levels": level_batch,
    "wide_random0": lambda: wide_random_batch(3),
    "wide_random1": lambda: wide_random_batch(4),
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_cpu_matches_oracle(batch: str) -> None:
    images, params = BATCHES[batch]()
    worst = check(images, params, run_color(images, params, "cpu"))
    print(f"cpu {batch}: max |out - oracle| = {worst:.6f} levels")


def test_identity_is_exact() -> None:
    # every 5th red level x all green x all blue levels
    images = [np.ascontiguousarray(all_colours(step=1)[::5])]
    out = run_color(images, IDENTITY[None], "cpu")
    np.testing.assert_array_equal(out[0], images[0])


def test_params_are_per_sample() -> None:
    img = edge_pixels()
    params = np.stack([IDENTITY, IDENTITY.copy()])
    params[1, 7:] = [-255, 255, 0]  # second sample only: R -> 0, G -> 255
    out = run_color([img, img], params, "cpu")
    np.testing.assert_array_equal(out[0], img)
    assert (out[1][..., 0] == 0).all() and (out[1][..., 1] == 255).all()
    np.testing.assert_array_equal(out[1][..., 2], img[..., 2])


def test_hue_shift_wraps_both_ways() -> None:
    red = np.array([[[255, 0, 0]]], dtype=np.uint8)
    params = np.stack([IDENTITY] * 4)
    params[:, 0] = [1 / 3, -1 / 3, 1.0, -2 / 3]  # red -> green, blue, red, green
    out = run_color([red] * 4, params, "cpu")
    assert [o[0, 0].tolist() for o in out] == [[0, 255, 0], [0, 0, 255], [255, 0, 0], [0, 255, 0]]


@pytest.mark.parametrize(
    ("image", "params", "match"),
    [
        (np.zeros((2, 2, 4), np.uint8), IDENTITY[None], "channels"),
        (np.zeros((2, 2, 3), np.float32), IDENTITY[None], "uint8"),
        (np.zeros((2, 2, 3), np.uint8), IDENTITY[None, :9], "params"),
        (np.zeros((2, 2, 3), np.uint8), np.array([[np.nan, *IDENTITY[1:]]], np.float32), "finite"),
    ],
)
def test_invalid_input_raises(image: np.ndarray, params: np.ndarray, match: str) -> None:
    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        x = fn.external_source(source=lambda: [image], batch=True, layout="HWC")
        p = fn.external_source(source=lambda: params, batch=True)
        return kernels.color(x, p, "cpu")

    pipe = graph()
    with pytest.raises(RuntimeError, match=match):
        pipe.build()
        pipe.run()


def test_color_rejects_unknown_device() -> None:
    with pytest.raises(ValueError, match="device"):
        kernels.color(None, None, "tpu")  # type: ignore[arg-type]


def test_load_is_idempotent(plugin: Path) -> None:
    assert kernels.load() == plugin
    assert plugin.is_file() and plugin.parent.parent == kernels._cache_root()
    assert kernels.build() == plugin  # cached: same key, no rebuild


@requires_gpu
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_gpu_matches_oracle(batch: str) -> None:
    images, params = BATCHES[batch]()
    worst = check(images, params, run_color(images, params, "gpu"))
    print(f"gpu {batch}: max |out - oracle| = {worst:.6f} levels")


@requires_gpu
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_gpu_agrees_with_cpu(batch: str) -> None:
    images, params = BATCHES[batch]()
    cpu = run_color(images, params, "cpu")
    gpu = run_color(images, params, "gpu")
    for i, (c, g) in enumerate(zip(cpu, gpu, strict=True)):
        diff = np.abs(c.astype(np.int16) - g.astype(np.int16))
        assert diff.max() <= 1, f"sample {i}: cpu and gpu differ by {diff.max()} levels"
        # both round to nearest, so they may differ only where the exact value is ~x.5
        expect = ref.color(images[i], params[i].astype(np.float64))
        near_tie = np.abs(expect - np.floor(expect) - 0.5) < ROUND_TOL
        assert not (diff[~near_tie]).any(), f"sample {i}: cpu and gpu differ off a rounding tie"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX2/SSE variants are x86-64's")
def test_cpu_kernel_variants_agree(tmp_path: Path) -> None:
    """The AVX2 kernel and the baseline's x86-64-v2 and SSE2 clones give the same bytes on all
    2^24 colours, for every parameter vector of scripts/bench_color_kernel.cc (its
    --hash-only mode): the plugin runs whichever this CPU has, the others only here."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ (apt-get install g++) to build the kernel's variants")
    variants = {
        "avx2": [],
        "x86-64-v2": ["-DAUGSVC_NO_AVX2"],
        "sse2": ["-DAUGSVC_NO_AVX2", "-DAUGSVC_BASELINE_CLONES="],
    }
    bench = Path(__file__).parent.parent / "scripts" / "bench_color_kernel.cc"
    builds = {
        name: subprocess.Popen(
            [cxx, *kernels.CXX_FLAGS, *flags, f"-I{kernels.SOURCE_DIR}", str(bench),
             str(kernels.SOURCE_DIR / "color_cpu.cc"), "-o", str(tmp_path / name)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, flags in variants.items()
    }  # fmt: skip
    for name, proc in builds.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {out[-3000:]}"
    runs = {
        name: subprocess.Popen([str(tmp_path / name), "--hash-only"], stdout=subprocess.PIPE,
                               text=True)
        for name in variants
    }
    hashes = {}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.startswith("output hash "), f"{name}: {out!r}"
        hashes[name] = out.split()[-1]
    assert len(set(hashes.values())) == 1, hashes


# ---- the build cache, with the compiler stubbed out -------------------------------------


@pytest.fixture
def fake_compile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Redirect the cache to tmp_path and replace compiling with writing a marker file."""
    calls: list[Path] = []
    lock = threading.Lock()

    def compile_(tc: object, out_dir: Path) -> None:
        with lock:
            calls.append(out_dir)
        (out_dir / kernels.LIB_NAME).write_bytes(b"fake %d" % len(calls))

    monkeypatch.setenv("AUGSVC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_compile", compile_)
    return calls


def test_build_caches_by_source_hash(
    fake_compile: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lib = kernels.build()
    assert lib.is_relative_to(tmp_path / "cache") and lib.read_bytes() == b"fake 1"
    assert kernels.build() == lib and len(fake_compile) == 1  # cached
    assert kernels.build(force=True) == lib and lib.read_bytes() == b"fake 2"

    src = tmp_path / "src"
    shutil.copytree(kernels.SOURCE_DIR, src)
    monkeypatch.setattr(kernels, "SOURCE_DIR", src)
    assert kernels.build() == lib  # same sources, same key
    with open(src / "color_math.h", "a") as f:
        f.write("// changed\n")
    changed = kernels.build()
    assert changed != lib and changed.read_bytes() == b"fake 3"
    assert not [p for p in changed.parent.iterdir() if p.name.startswith(".build-")]


def test_concurrent_builds_compile_once(fake_compile: list[Path]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(kernels.build())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert len(fake_compile) == 1


def test_missing_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(kernels.KernelBuildError, match="install g\\+\\+"):
        kernels.build()


def test_compiler_errors_are_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    shutil.copytree(kernels.SOURCE_DIR, src)
    for name in (*kernels.CPU_SOURCES, *kernels.GPU_SOURCES):
        (src / name).write_text("#error augsvc-broken-on-purpose\n")
    monkeypatch.setattr(kernels, "SOURCE_DIR", src)
    monkeypatch.setenv("AUGSVC_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(kernels.KernelBuildError, match="augsvc-broken-on-purpose"):
        kernels.build()
    assert "augsvc-broken-on-purpose" in capsys.readouterr().err
    assert not list((tmp_path / "cache").glob(f"*/{kernels.LIB_NAME}"))


def test_prebuilt_library_from_the_environment(tmp_path: Path) -> None:
    """AUGSVC_KERNEL_LIB loads a given .so without building (hosts with no compiler)."""
    lib = tmp_path / "libaugsvc_kernels.so"
    shutil.copy(kernels.build(), lib)
    code = ("from augsvc.engine import kernels; import sys; p = kernels.load(); "
            "print(p); sys.exit(0 if str(p) == sys.argv[1] else 3)")
    env = {**os.environ, "AUGSVC_KERNEL_LIB": str(lib), "PATH": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", code, str(lib)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    env["AUGSVC_KERNEL_LIB"] = str(tmp_path / "missing.so")
    out = subprocess.run([sys.executable, "-c", code, str(lib)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "is not a file" in out.stderr
