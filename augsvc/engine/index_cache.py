"""The dataset index cache: per-file size, mtime and header, as JSON beside the dataset.

The cache lives beside the dataset (`<root>/.augsvc-index.json`, or
`<manifest>.augsvc-index.json`), or under `~/.cache/augsvc/index/` when that folder is
read-only; of the two, the newer file wins. Writes are atomic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

__all__ = ["CACHE_FORMAT", "load_cache", "save_cache"]

log = logging.getLogger("augsvc.engine.dataset")

CACHE_FORMAT = "augsvc-index/1"

def _cache_candidates(primary: Path, src: Path) -> list[Path]:
    """The cache beside the dataset, then the per-user fallback for read-only folders."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(os.fsencode(src)).hexdigest()[:24]
    return [primary, base / "augsvc" / "index" / f"{digest}.json"]


def load_cache(primary: Path, src: Path) -> dict[str, list]:
    """key -> [size, mtime_ns, height, width, reason or None]; {} if none is usable.

    Of the two candidate locations the newer file wins (a read-only folder may hold a
    stale cache while the fresh one lives under ~/.cache).
    """
    found = [p for p in _cache_candidates(primary, src) if p.is_file()]
    for path in sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            cols = [data[k] for k in ("keys", "size", "mtime_ns", "height", "width", "error")]
            return {k: list(v) for k, *v in zip(*cols, strict=True)}
        except (OSError, AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring invalid index cache %s: %s", path, exc)
    return {}


def save_cache(primary: Path, src: Path, entries: dict[str, list]) -> None:
    """Write the cache atomically beside the dataset, else under ~/.cache; warn if neither."""
    data: dict[str, object] = {"format": CACHE_FORMAT, "dataset": str(src), "keys": list(entries)}
    for i, name in enumerate(("size", "mtime_ns", "height", "width", "error")):
        data[name] = [entry[i] for entry in entries.values()]
    text = json.dumps(data, separators=(",", ":"))
    for path in _cache_candidates(primary, src):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            return
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    log.warning("could not write the index cache for %s", src)
