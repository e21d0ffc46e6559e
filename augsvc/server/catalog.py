"""The datasets a server serves: each one's index and statistics, loaded once at start."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from augsvc.core.spec import STATS_SOURCES
from augsvc.core.stats import IMAGENET, DatasetStats, StatsError, load
from augsvc.core.text import scrub
from augsvc.engine.dataset import DatasetIndex, open_dataset
from augsvc.engine.statistics import load_stats
from augsvc.wire.convert import select_stats_source

__all__ = ["STATS_SOURCES", "Catalog", "DatasetEntry", "load_catalog"]

log = logging.getLogger("augsvc.server")


@dataclass(frozen=True)
class DatasetEntry:
    """A served dataset: its index and the statistics sources available for it."""

    name: str
    index: DatasetIndex
    stats: Mapping[str, DatasetStats]  # source ("dataset", "imagenet") -> stats
    missing_stats: Mapping[str, str]  # source -> why it is not available (no server paths)

    def resolve_stats(self, choice: str) -> tuple[str, DatasetStats]:
        """(source, stats) of an `AugmentSpec.stats` choice: "auto" is "dataset" when this
        dataset has its own, else "imagenet". LookupError saying why for a missing source."""
        source = select_stats_source(choice, self.stats) if choice == "auto" else choice
        stats = self.stats.get(source)
        if stats is None:
            raise LookupError(self.missing_stats.get(source, "not available"))
        return source, stats

    def scrub(self, text: str) -> str:
        """`text` without this dataset's server paths (for what is sent to clients)."""
        return _scrub(self.name, self.index, text)


def _scrub(name: str, index: DatasetIndex, text: str) -> str:
    # a folder dataset's source is its root: the second entry wins
    return scrub(text, {str(index.source): f"<dataset {name}>",
                        str(index.root): f"<folder of dataset {name}>"})


Catalog = Mapping[str, DatasetEntry]


def load_catalog(
    datasets: Mapping[str, str | os.PathLike[str]],
    stats_files: Mapping[str, str | os.PathLike[str]] | None = None,
    *,
    allow_outside: bool = False,
) -> Catalog:
    """Index every dataset (`open_dataset`, cached) and load its statistics, once.

    A dataset's own statistics come from `stats_files[name]` when given (it must load),
    else from the file `augsvc stats` writes beside the dataset, when present. A
    dataset without them is served with the ImageNet preset for stats "auto", and one
    warning says how to compute them. `allow_outside` serves links and manifest rows that
    resolve outside a dataset's root. The statistics' descriptions and the reasons in
    `missing_stats` name no server path. Raises DatasetError / StatsError for a dataset
    that cannot be served.
    """
    stats_files = dict(stats_files or {})
    unknown = sorted(set(stats_files) - set(datasets))
    if unknown:
        raise StatsError(f"statistics file for {unknown[0]!r}, which is not a served dataset")
    catalog: dict[str, DatasetEntry] = {}
    for name, path in datasets.items():
        index = open_dataset(path, allow_outside=allow_outside)
        stats, missing = {"imagenet": IMAGENET}, {}
        if name in stats_files:
            stats["dataset"] = load(stats_files[name])
        else:
            try:
                stats["dataset"] = load_stats(index, "dataset")
            except StatsError as exc:
                missing["dataset"] = _scrub(name, index, str(exc))
                log.warning("dataset %s: %s; until then stats 'auto' (the default) uses the "
                            "ImageNet preset for fancy PCA and normalize (a statistics file "
                            "kept elsewhere: --dataset %s=PATH,stats=FILE)", name, exc, name)
        if "dataset" in stats:
            stats["dataset"] = dataclasses.replace(
                stats["dataset"], source=_scrub(name, index, stats["dataset"].source))
        log.info("dataset %s: %d images, %d classes, stats: %s%s", name, len(index),
                 len(index.classes), ", ".join(s for s in STATS_SOURCES if s in stats),
                 f", {len(index.rejected)} file(s) rejected" if index.rejected else "")
        catalog[name] = DatasetEntry(name=name, index=index, stats=stats, missing_stats=missing)
    return catalog
