"""The GPU check's steps, one JSON and a short table (run by scripts/gpu_check.sh).

1. the machine: GPU name, DALI, torch and the plugin;
2. `pytest -m gpu` (the CUDA kernel against the numpy oracle, GPU vs CPU pipelines,
   invariances on the GPU, the loader's device="cuda" path);
3. the CUDA colour kernel alone (.gpu/bench_color_gpu, built by scripts/gpu_prepare.sh);
4. `augsvc bench --device gpu`: with 1 worker every measurement but torchvision, then (b)
   with 2 and 4 workers, at batch 256 on crops of real photographs (augsvc.bench.photos).

Every step has a time limit, so the whole check ends in under 8 minutes; a failed step is
recorded and the next one runs. `--device cpu --small` is the rehearsal the tests run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_BENCH = ROOT / ".gpu" / "bench_color_gpu"
NOISE = re.compile(r"nvjpeg2k|nvtiff", re.IGNORECASE)


def _run(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """Run `cmd`, its output to `log` (minus DALI's codec warnings); (exit code or None on
    timeout, output)."""
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace") + f"\n[timed out after {timeout:.0f} s]"
    out = "\n".join(line for line in out.splitlines() if not NOISE.search(line))
    log.write_text(f"$ {' '.join(cmd)}\n[{time.monotonic() - start:.1f} s]\n{out}\n")
    return code, out


def _machine() -> dict:
    info: dict = {"python": sys.version.split()[0]}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["gpu"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["gpu"] = None
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError as exc:
        info["dali"] = f"not importable: {exc}"
    info["kernel_lib"] = os.environ.get("AUGSVC_KERNEL_LIB") or "built from kernels/ (cache)"
    return info


def _pytest(out: Path, timeout: float) -> dict:
    code, text = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-ra",
                       "-p", "no:cacheprovider", "tests"], timeout, out / "pytest-gpu.log")
    summary = next((ln for ln in reversed(text.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|error)", ln)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    return {"exit_code": code, "summary": summary.strip("= "), **counts}


def _kernel(out: Path, device: str, timeout: float) -> dict:
    if device != "gpu":
        return {"note": "not run: needs a GPU"}
    if not KERNEL_BENCH.is_file():
        return {"note": f"not run: {KERNEL_BENCH.relative_to(ROOT)} missing "
                        "(scripts/gpu_prepare.sh builds it)"}
    code, text = _run([str(KERNEL_BENCH), "256", "224"], timeout, out / "kernel.log")
    line = next((ln for ln in text.splitlines() if ln.startswith("{")), None)
    result = json.loads(line) if line else {}
    return {"exit_code": code, **result}


def _bench(out: Path, args: argparse.Namespace, data: Path, workers: int, full: bool) -> dict:
    name = f"bench-w{workers}"
    cmd = [sys.executable, "-m", "augsvc", "bench", "--device", args.device,
           "--dataset", str(data), "--batch-size", str(args.batch_size),
           "--duration", str(args.duration), "--workers", str(workers),
           "--threads", str(args.threads), "--skip", "d", "--json", str(out / f"{name}.json")]
    if not full:
        cmd += ["--skip", "a", "--skip", "c"]
    code, _ = _run(cmd, args.step_timeout, out / f"{name}.log")
    try:
        result = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {"exit_code": code, "note": f"no result: see {name}.log"}
    figures = {k: round(f["img_s"], 1) for k, f in result["figures"].items() if f["img_s"]}
    ratios = {k: round(v, 3) for k, v in result["ratios"].items() if v is not None}
    return {"exit_code": code, "img_s": figures, "ratios": ratios}


def _table(result: dict) -> str:
    lines = [f"gpu-check on {result['machine'].get('gpu') or 'no GPU'} "
             f"(DALI {result['machine'].get('dali')}), {result['seconds']:.0f} s"]
    t = result["pytest"]
    lines.append(f"pytest -m gpu        {t.get('summary') or 'exit ' + str(t.get('exit_code'))}")
    k = result["kernel"]
    lines.append("colour kernel alone  " + (f"{k['img_s']:,.0f} img/s, {k['gb_s']} GB/s, "
                 f"max diff {k['max_diff_levels']} levels" if "img_s" in k else k.get("note", "")))
    for name, b in result["bench"].items():
        figs = b.get("img_s")
        if not figs:
            lines.append(f"{name:<20} {b.get('note', 'failed')}")
            continue
        shown = "  ".join(f"{key} {value:,.0f}" for key, value in figs.items())
        ratios = "  ".join(f"{key} {value:.2f}" for key, value in b.get("ratios", {}).items())
        lines.append(f"{name:<20} img/s: {shown}")
        lines.append(f"{'':<20} ratios: {ratios}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON, table and logs")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--small", action="store_true",
                   help="rehearsal size: 16 images, batch 8, 1 s per measurement, workers 1 and 2")
    p.add_argument("--images", type=int, default=512, help="photo crops to write (default: 512)")
    p.add_argument("--epoch-images", type=int, default=8192,
                   help="images per epoch, the set listed repeatedly (default: 8192)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=4, help="DALI threads per pipeline")
    p.add_argument("--workers", default="1,2,4", help="server workers per bench run")
    p.add_argument("--step-timeout", type=float, default=150.0, help="seconds per bench run")
    args = p.parse_args(argv)
    if args.small:
        args.images, args.epoch_images, args.batch_size = 16, 64, 8
        args.duration, args.threads, args.workers = 1.0, 1, "1,2"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result: dict = {"machine": _machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"[1/4] machine: {result['machine']}", flush=True)
    print("[2/4] pytest -m gpu ...", flush=True)
    result["pytest"] = _pytest(args.out, timeout=180)
    print(f"      {result['pytest']}", flush=True)
    print("[3/4] colour kernel alone ...", flush=True)
    result["kernel"] = _kernel(args.out, args.device, timeout=60)
    print(f"      {result['kernel']}", flush=True)
    from augsvc.bench.photos import make_photo_set, repeat_manifest

    result["bench"] = {}
    with tempfile.TemporaryDirectory(prefix="augsvc-gpu-check-") as tmp:
        data = repeat_manifest(make_photo_set(Path(tmp), args.images), args.epoch_images)
        for i, workers in enumerate(int(w) for w in args.workers.split(",")):
            print(f"[4/4] augsvc bench --device {args.device} --workers {workers} ...", flush=True)
            name = f"bench-w{workers}"
            result["bench"][name] = _bench(args.out, args, data, workers, full=i == 0)
            print(f"      {result['bench'][name]}", flush=True)
    engine = result["bench"].get(f"bench-w{args.workers.split(',')[0]}", {}).get("img_s", {})
    for b in result["bench"].values():  # the target: (b) with N workers over (a)
        if engine.get("a") and b.get("img_s", {}).get("b"):
            b.setdefault("ratios", {})["b/a(1 worker)"] = round(b["img_s"]["b"] / engine["a"], 3)
    result["seconds"] = time.monotonic() - started
    (args.out / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _table(result)
    (args.out / "gpu-check.txt").write_text(table + "\n")
    print(table)
    ok = (result["pytest"].get("exit_code") == 0
          and all(b.get("exit_code") == 0 for b in result["bench"].values())
          and result["kernel"].get("exit_code", 0) == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
