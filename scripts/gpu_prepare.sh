#!/usr/bin/env bash
# On the CPU machine: build what `make gpu-check` needs on a GPU host that has no package
# registry, into the git-ignored .device/ (DALI for Python 3.12, three parts) and .gpu/
# (the colour-kernel plugin for sm_80/sm_90 + PTX, the CUDA kernel micro-benchmark, and
# the wheels the GPU image lacks). Then, with the device tool: three `run` calls (see
# docs/gpu.md): copy .device/p1 and .device/p2 to /tmp/dl, then carry .device/p3 and .gpu
# and run `make gpu-check`.
#
#   bash scripts/gpu_prepare.sh        # from the project root, after `make install`
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
BUNDLE="${DALI_BUNDLE:-../shared/gpu/dali-bundle.sh}"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_prepare: run 'make install' first (no $PY)" >&2; exit 2; }
command -v nvcc >/dev/null || { echo "gpu_prepare: nvcc not found (CUDA 13 needed for sm_90)" >&2; exit 2; }
[ -f "$BUNDLE" ] || { echo "gpu_prepare: no DALI bundle script at $BUNDLE (set DALI_BUNDLE)" >&2; exit 2; }

bash "$BUNDLE"
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl
lib=$(.venv/bin/augsvc build-kernels)
cp "$lib" "$(dirname "$lib")/build-info.json" .gpu/
grep -q '"gpu": true' .gpu/build-info.json || { echo "gpu_prepare: the plugin was built without CUDA" >&2; exit 1; }
nvcc -std=c++20 -O3 -gencode=arch=compute_90,code=sm_90 -Ikernels \
    scripts/bench_color_kernel.cu -o .gpu/bench_color_gpu
# the GPU image has grpcio and protobuf, maybe older than the generated code needs, and
# neither health checking nor reflection: carry this venv's versions, for Python 3.12
pins=$($PY -m pip list --format=freeze 2>/dev/null | grep -iE '^(grpcio|protobuf|grpcio-health-checking|grpcio-reflection)==')
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl $pins 2>&1 | grep -v '^WARNING: Location' || true
ls .gpu/whl
du -sh .device/p1 .device/p2 .device/p3 .gpu
echo "ready: carry .device/p3 and .gpu (after p1 and p2), then: make gpu-check"
