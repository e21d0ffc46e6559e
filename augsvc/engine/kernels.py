"""Build (on demand, cached) and load the augsvc DALI operator plugin from `kernels/`.

The plugin registers `AugsvcColor` (Python: `fn.augsvc_color`): exact HSV power/scale/
shift, hue rotation and the fancy-PCA offset on uint8 HWC RGB images, one pass per pixel,
with a C++ CPU backend and, when `nvcc` is found, a CUDA GPU backend.

The build is a plain g++/nvcc run (no CMake). Its result is cached under
`$AUGSVC_KERNEL_CACHE` (default `~/.cache/augsvc/kernels`) in a folder named by a hash
of the kernel sources, the DALI version and the compilers, so a changed source or an
upgraded DALI rebuilds by itself. Concurrent builds are serialised by a file lock and the
library is moved into place atomically.

`$AUGSVC_KERNEL_LIB`, when set, names a prebuilt `libaugsvc_kernels.so` to load as is,
with no compiler needed: for containers and hosts that run what a build host made
(`augsvc build-kernels` prints the path). It must match the DALI version it was built
against (see `build-info.json` beside it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nvidia.dali.data_node import DataNode

__all__ = ["KernelBuildError", "build", "color", "load"]

# `augsvc/_kernels` links to the repository's `kernels/`; a wheel carries the files there
SOURCE_DIR = Path(__file__).parent / "_kernels"
CPU_SOURCES = ("augsvc_color.cc", "color_cpu.cc")
GPU_SOURCES = ("augsvc_color.cu",)
HEADERS = ("augsvc_color.h", "color_cpu.h", "color_math.h")
LIB_NAME = "libaugsvc_kernels.so"
NUM_PARAMS = 10

# sm_80 (A100), sm_90 (H100/H200) as SASS, plus compute_90 PTX for newer GPUs to JIT.
GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)
# -fno-math-errno, -fno-trapping-math: value-preserving (unlike -ffast-math). The CPU kernel
# (color_cpu.cc) picks AVX2 or SSE at run time by itself; -Wno-psabi: its 32-byte vectors pass
# between internal inlined helpers only, so g++'s note that their ABI differs without AVX is moot.
CXX_FLAGS = (
    "-std=c++20", "-O3", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi",
)
NVCC_FLAGS = ("-std=c++20", "-O3", "-Xcompiler=-fPIC", *GENCODE)
_RECIPE = "2"  # bump when the build recipe changes in a way the hash would not see

_load_lock = threading.Lock()
_loaded: Path | None = None


class KernelBuildError(RuntimeError):
    """The plugin cannot be built here: a missing tool, or a compiler error."""


@dataclass(frozen=True)
class _Toolchain:
    cxx: str
    cxx_version: str
    dali_version: str
    dali_flags: tuple[str, ...]  # include dir + ABI define, from nvidia.dali.sysconfig
    dali_link: tuple[str, ...]
    cuda_include: Path
    nvcc: str | None
    nvcc_version: str
    cudart_dir: Path | None


def _first_line(cmd: Sequence[str], last: bool = False) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    lines = out.splitlines() or [""]
    return lines[-1] if last else lines[0]


def _find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        found = shutil.which(os.environ["NVCC"])
        if not found:
            raise KernelBuildError(f"NVCC={os.environ['NVCC']} is not an executable")
        return found
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _cuda_roots(nvcc: str | None) -> list[Path]:
    roots = [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if p]
    if nvcc:
        roots.append(Path(nvcc).resolve().parent.parent)
    roots.append(Path("/usr/local/cuda"))
    return roots


def _find_cuda_include(nvcc: str | None) -> Path | None:
    candidates = [
        r / sub for r in _cuda_roots(nvcc) for sub in ("include", "targets/x86_64-linux/include")
    ]
    # pip's CUDA runtime wheels (nvidia-cuda-runtime) put the headers in site-packages
    for sp in [*site.getsitepackages(), site.getusersitepackages()]:
        candidates.extend(Path(sp).glob("nvidia/cu*/include"))
        candidates.append(Path(sp) / "nvidia" / "cuda_runtime" / "include")
    return next((c for c in candidates if (c / "cuda_runtime_api.h").is_file()), None)


def _find_cudart_static(nvcc: str) -> Path | None:
    for root in _cuda_roots(nvcc):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if (root / sub / "libcudart_static.a").is_file():
                return root / sub
    return None


def _toolchain() -> _Toolchain:
    try:
        import nvidia.dali as dali
        from nvidia.dali import sysconfig
    except ImportError as e:
        raise KernelBuildError(
            "DALI is not installed: install the server extra, "
            "`pip install 'augsvc[server]'` (nvidia-dali-cuda130==2.4.0)"
        ) from e
    cxx_env = os.environ.get("CXX")
    cxx = shutil.which(cxx_env) if cxx_env else shutil.which("g++") or shutil.which("c++")
    if not cxx:
        where = f" (CXX={cxx_env} is not an executable)" if cxx_env else ""
        raise KernelBuildError(
            f"no C++ compiler found{where}: install g++ >= 10 (e.g. `apt-get install g++`) "
            "or set CXX to one"
        )
    nvcc = _find_nvcc()
    cuda_include = _find_cuda_include(nvcc)
    if cuda_include is None:
        raise KernelBuildError(
            "CUDA headers (cuda_runtime_api.h) not found; DALI's headers need them even for "
            "the CPU operator: install the CUDA toolkit (or `pip install nvidia-cuda-runtime`) "
            "or set CUDA_HOME"
        )
    cudart_dir = _find_cudart_static(nvcc) if nvcc else None
    if nvcc and cudart_dir is None:
        raise KernelBuildError(
            f"nvcc found ({nvcc}) but not libcudart_static.a beside it: install the full "
            "CUDA toolkit, set CUDA_HOME, or set NVCC to a toolkit's nvcc"
        )
    return _Toolchain(
        cxx=cxx,
        cxx_version=_first_line([cxx, "--version"]),
        dali_version=dali.__version__,
        dali_flags=tuple(sysconfig.get_compile_flags()),
        dali_link=tuple(sysconfig.get_link_flags()),
        cuda_include=cuda_include,
        nvcc=nvcc,
        nvcc_version=_first_line([nvcc, "--version"], last=True) if nvcc else "",
        cudart_dir=cudart_dir,
    )


def _cache_root() -> Path:
    env = os.environ.get("AUGSVC_KERNEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "augsvc" / "kernels"


def _key(tc: _Toolchain) -> str:
    h = hashlib.sha256()
    for name in (*HEADERS, *CPU_SOURCES, *GPU_SOURCES):
        path = SOURCE_DIR / name
        if not path.is_file():
            raise KernelBuildError(f"kernel source missing: {path}")
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    parts = (_RECIPE, tc.dali_version, tc.cxx_version, tc.nvcc_version, *CXX_FLAGS, *NVCC_FLAGS)
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:16]


def _run_all(cmds: list[list[str]]) -> None:
    """Run the compile commands in parallel; raise with the compiler output on failure."""
    procs = [
        (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for cmd in cmds
    ]
    failures = []
    for cmd, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append((cmd, proc.returncode, out))
    if failures:
        msg = []
        for cmd, rc, out in failures:
            print(f"$ {' '.join(cmd)}\n{out}", file=sys.stderr)
            tail = "\n".join(out.splitlines()[-30:])
            msg.append(f"`{' '.join(cmd[:2])} ...` exited with {rc}:\n{tail}")
        raise KernelBuildError("building the kernel plugin failed\n" + "\n".join(msg))


def _compile(tc: _Toolchain, out_dir: Path) -> None:
    # -isystem: DALI's headers warn a lot under g++ 12; only our own warnings matter
    includes = ["-isystem", str(tc.cuda_include)]
    for flag in tc.dali_flags:
        includes += ["-isystem", flag[2:]] if flag.startswith("-I") else [flag]
    objs, cmds = [], []
    for name in CPU_SOURCES:
        obj = out_dir / (name + ".o")
        cmds.append([tc.cxx, *CXX_FLAGS, *includes, "-c", str(SOURCE_DIR / name), "-o", str(obj)])
        objs.append(str(obj))
    if tc.nvcc:
        for name in GPU_SOURCES:
            obj = out_dir / (name + ".o")
            cmds.append(
                [tc.nvcc, *NVCC_FLAGS, *includes, "-c", str(SOURCE_DIR / name), "-o", str(obj)]
            )
            objs.append(str(obj))
    _run_all(cmds)
    # cudart is linked statically, so loading the plugin needs neither libcudart nor libcuda.
    cuda_link = (
        [f"-L{tc.cudart_dir}", "-lcudart_static", "-lrt", "-ldl", "-lpthread"] if tc.nvcc else []
    )
    _run_all([[tc.cxx, "-shared", "-o", str(out_dir / LIB_NAME), *objs, *tc.dali_link, *cuda_link]])


def build(force: bool = False) -> Path:
    """Compile the plugin (or reuse the cached one) and return the path of the `.so`."""
    tc = _toolchain()
    final_dir = _cache_root() / _key(tc)
    lib = final_dir / LIB_NAME
    if lib.is_file() and not force:
        return lib
    final_dir.mkdir(parents=True, exist_ok=True)
    with open(final_dir.parent / (final_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if lib.is_file() and not force:
            return lib
        with tempfile.TemporaryDirectory(dir=final_dir, prefix=".build-") as tmp:
            _compile(tc, Path(tmp))
            info = {
                "dali": tc.dali_version,
                "cxx": tc.cxx_version,
                "nvcc": tc.nvcc_version or None,
                "gpu": tc.nvcc is not None,
                "gencode": list(GENCODE) if tc.nvcc else [],
            }
            (Path(tmp) / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
            os.replace(Path(tmp) / "build-info.json", final_dir / "build-info.json")
            os.replace(Path(tmp) / LIB_NAME, lib)  # atomic: readers see the old or the new file
    return lib


def load() -> Path:
    """Build if needed and load the plugin into DALI, once per process; return its path."""
    global _loaded
    with _load_lock:
        if _loaded is None:
            from nvidia.dali import plugin_manager

            prebuilt = os.environ.get("AUGSVC_KERNEL_LIB")
            if prebuilt and not Path(prebuilt).is_file():
                raise KernelBuildError(f"AUGSVC_KERNEL_LIB={prebuilt} is not a file")
            lib = Path(prebuilt) if prebuilt else build()
            plugin_manager.load_library(str(lib))
            _loaded = lib
        return _loaded


def color(images: DataNode, params: DataNode, device: str) -> DataNode:
    """Apply the exact colour op to uint8 HWC RGB `images` (on `device`, "cpu" or "gpu").

    `params` is a CPU DataNode whose samples are float32 vectors of length 10, in
    `augsvc.core.draws.COLOR_PARAMS` order (e.g. `fn.external_source(batch=True)` fed a
    (B, 10) float32 array). It reaches the operator as the per-sample argument input
    `params`, which DALI keeps on the CPU for both backends.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    load()
    from nvidia.dali import fn

    return fn.augsvc_color(images, params=params, device=device)
