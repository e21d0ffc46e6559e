"""Value types shared by every layer: what the engine reports and the wire carries."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DroppedSample", "Substitution"]


@dataclass(frozen=True)
class DroppedSample:
    """A sample left out of its batch (e.g. a corrupt image), and why; `BatchHeader.dropped`."""

    sample_id: int
    path: str
    reason: str


@dataclass(frozen=True)
class Substitution:
    """A sample that could not be used, replaced in row `row` of its batch by sample
    `substitute_id`; `BatchHeader.substituted`."""

    row: int
    sample_id: int
    path: str
    reason: str
    substitute_id: int
