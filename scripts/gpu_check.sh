#!/usr/bin/env bash
# `make gpu-check`: the GPU checks, on a GPU host with no package registry (docs/gpu.md).
# Sets DALI up from the carried bundle (.device/, see scripts/gpu_prepare.sh) unless DALI
# imports already, installs the carried wheels (.gpu/whl) into /tmp/site, loads the
# prebuilt plugin (.gpu/libaugsvc_kernels.so), then runs scripts/gpu_check.py: pytest -m gpu,
# the CUDA kernel alone, and `augsvc bench --device gpu` with 1, 2 and 4 workers. Writes
# gpu-check.json and gpu-check.txt under $OUT (default ./gpu-check-out) and prints the
# table last. Options go to gpu_check.py (`--device cpu --small` is the CPU rehearsal).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
rehearsal=0
case " $* " in *" --device cpu "*) rehearsal=1 ;; esac  # the CPU rehearsal uses this venv as is
if [ "$rehearsal" = 0 ] && [ -d .gpu/whl ] && compgen -G ".gpu/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .gpu/whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -c "import nvidia.dali" >/dev/null 2>&1; then
  if [ -f .device/setup.sh ]; then
    bash .device/setup.sh || exit 3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu-check: DALI does not import and there is no .device/setup.sh (scripts/gpu_prepare.sh makes it)" >&2
    exit 3
  fi
fi
[ "$rehearsal" = 0 ] && [ -f .gpu/libaugsvc_kernels.so ] && export AUGSVC_KERNEL_LIB="$PWD/.gpu/libaugsvc_kernels.so"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | grep --line-buffered -viE 'nvjpeg2k|nvtiff'
exit "${PIPESTATUS[0]}"
