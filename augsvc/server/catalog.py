"""The datasets a server serves: each one's index and statistics, loaded once at start."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from augsvc.core.stats import DatasetStats, StatsError
from augsvc.engine.dataset import DatasetIndex, open_dataset
from augsvc.engine.statistics import load_stats

__all__ = ["STATS_SOURCES", "Catalog", "DatasetEntry", "load_catalog"]

log = logging.getLogger("augsvc.server")

STATS_SOURCES = ("dataset", "imagenet")


@dataclass(frozen=True)
class DatasetEntry:
    """A served dataset: its index and the statistics sources available for it."""

    name: str
    index: DatasetIndex
    stats: Mapping[str, DatasetStats]  # source ("dataset", "imagenet") -> stats
    missing_stats: Mapping[str, str]  # source -> why it is not available


Catalog = Mapping[str, DatasetEntry]


def load_catalog(datasets: Mapping[str, str | os.PathLike[str]]) -> Catalog:
    """Index every dataset (`open_dataset`, cached) and load its statistics, once.

    Raises DatasetError / StatsError for a dataset that cannot be served.
    """
    catalog: dict[str, DatasetEntry] = {}
    for name, path in datasets.items():
        index = open_dataset(path)
        stats, missing = {}, {}
        for source in STATS_SOURCES:
            try:
                stats[source] = load_stats(index, source)
            except StatsError as exc:
                missing[source] = str(exc)
        if "imagenet" not in stats:
            raise StatsError(f"dataset {name}: {missing['imagenet']}")
        for path_, reason in index.rejected[:3]:
            log.warning("dataset %s: rejected %s: %s", name, path_, reason)
        log.info("dataset %s: %d images, %d classes, stats: %s%s", name, len(index),
                 len(index.classes), ", ".join(stats),
                 f", {len(index.rejected)} file(s) rejected" if index.rejected else "")
        catalog[name] = DatasetEntry(name=name, index=index, stats=stats, missing_stats=missing)
    return catalog
