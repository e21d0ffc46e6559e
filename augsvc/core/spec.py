"""AugmentSpec: every switch, range and probability of an augmentation request.

A spec is a frozen dataclass of flat, typed fields (timm style). It is checked when it
is made: `AugmentSpec(p_hflip=2)` raises `SpecError` naming the field and what is
allowed (the server maps the same error to INVALID_ARGUMENT). Lists become tuples and
an integer `size` a square. `to_dict`/`from_dict` round-trip through plain JSON;
unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from augsvc.core.text import clip

__all__ = ["CORRUPT_POLICIES", "CROP_MODES", "DTYPES", "LAYOUTS", "STATS_CHOICES", "STATS_SOURCES",
           "AugmentSpec", "SpecError"]

CROP_MODES = ("random_resized_crop", "random_crop", "center_crop")
LAYOUTS = ("NHWC", "NCHW")
DTYPES = ("uint8", "float16", "float32")
INTERPOLATIONS = ("linear", "cubic", "triangular", "nearest")
STATS_SOURCES = ("imagenet", "dataset")  # where statistics come from
STATS_CHOICES = ("auto", *STATS_SOURCES)  # "auto": the dataset's own when it has them
CORRUPT_POLICIES = ("substitute", "drop")
MAX_SIZE = 4096


class SpecError(ValueError):
    """An invalid AugmentSpec; `field` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"AugmentSpec.{field_name}: {message}")
        self.field = field_name


Range = tuple[float, float]


@dataclass(frozen=True)
class AugmentSpec:
    """What to do to each image. Defaults are the seed article's (DESIGN.md table)."""

    # crop
    crop: str = "random_resized_crop"
    size: tuple[int, int] = (224, 224)
    scale: Range = (0.08, 1.0)
    ratio: Range = (3 / 4, 4 / 3)
    resize: int = 256
    interpolation: str = "linear"
    antialias: bool = True
    # flip
    p_hflip: float = 0.5
    p_vflip: float = 0.0
    # HSV power/scale/shift on S and V, shift on H (one draw per image)
    hsv: bool = True
    p_hsv: float = 1.0
    hue_shift: Range = (-0.1, 0.1)
    sat_pow: Range = (0.25, 4.0)
    sat_scale: Range = (0.7, 1.4)
    sat_shift: Range = (-0.1, 0.1)
    val_pow: Range = (0.25, 4.0)
    val_scale: Range = (0.7, 1.4)
    val_shift: Range = (-0.1, 0.1)
    # AlexNet's fancy-PCA lighting
    pca: bool = True
    pca_sigma: float = 0.1
    # output
    normalize: bool = False
    layout: str = "NHWC"
    dtype: str = "uint8"
    stats: str = "auto"
    # a sample whose image cannot be decoded: "substitute" keeps the batch full with a
    # deterministic stand-in (augsvc.core.sampling.substitutes); "drop" leaves it out
    corrupt: str = "substitute"

    def __post_init__(self) -> None:
        for name, value in _coerce(self.__dict__).items():
            object.__setattr__(self, name, value)
        self.validate()

    @classmethod
    def alexnet(cls) -> AugmentSpec:
        """Training preset: the DESIGN table's defaults (RRC 224, h-flip, HSV jitter, PCA 0.1)."""
        return cls()

    @classmethod
    def eval(cls) -> AugmentSpec:
        """Evaluation preset: shorter side to 256, centre crop 224, no flips, no colour ops;
        corrupt images dropped (and reported), never replaced by another sample."""
        return cls(crop="center_crop", p_hflip=0.0, p_vflip=0.0, hsv=False, pca=False,
                   corrupt="drop")

    def replace(self, **changes: Any) -> AugmentSpec:
        """A validated copy with `changes` applied (the original is not touched)."""
        return dataclasses.replace(self, **changes)

    @property
    def colour(self) -> bool:
        """Whether the colour kernel has anything to do."""
        return (self.hsv and self.p_hsv > 0) or (self.pca and self.pca_sigma > 0)

    def validate(self) -> AugmentSpec:
        """Check every field; return self, or raise SpecError naming the field."""
        _choice("crop", self.crop, CROP_MODES)
        _choice("layout", self.layout, LAYOUTS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("interpolation", self.interpolation, INTERPOLATIONS)
        _choice("stats", self.stats, STATS_CHOICES)
        _choice("corrupt", self.corrupt, CORRUPT_POLICIES)
        if (
            len(self.size) != 2
            or not all(isinstance(v, int) and 1 <= v <= MAX_SIZE for v in self.size)
        ):
            raise SpecError("size", f"expected (height, width), integers in [1, {MAX_SIZE}], "
                            f"got {self.size!r}")
        if not (isinstance(self.resize, int) and 1 <= self.resize <= MAX_SIZE):
            raise SpecError("resize",
                            f"expected an integer in [1, {MAX_SIZE}], got {self.resize!r}")
        if self.crop != "random_resized_crop" and self.resize < max(self.size):
            raise SpecError("resize", f"the shorter side is resized to {self.resize}, smaller than "
                            f"the crop size {self.size}; use resize >= {max(self.size)}")
        _range("scale", self.scale, 0.0, 1.0, open_low=True)
        _range("ratio", self.ratio, 0.0, math.inf, open_low=True)
        for name in ("p_hflip", "p_vflip", "p_hsv"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                raise SpecError(name, f"expected a probability in [0, 1], got {value!r}")
        _range("hue_shift", self.hue_shift, -0.5, 0.5)
        _range("sat_pow", self.sat_pow, 0.0, 16.0, open_low=True)
        _range("val_pow", self.val_pow, 0.0, 16.0, open_low=True)
        _range("sat_scale", self.sat_scale, 0.0, 16.0)
        _range("val_scale", self.val_scale, 0.0, 16.0)
        _range("sat_shift", self.sat_shift, -1.0, 1.0)
        _range("val_shift", self.val_shift, -1.0, 1.0)
        if not (_is_number(self.pca_sigma) and 0.0 <= self.pca_sigma <= 10.0):
            raise SpecError("pca_sigma", f"expected a number in [0, 10], got {self.pca_sigma!r}")
        for name in ("hsv", "pca", "normalize", "antialias"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(name, f"expected true or false, got {getattr(self, name)!r}")
        if self.normalize and self.dtype == "uint8":
            raise SpecError("dtype", "normalize=true needs dtype float16 or float32, got uint8")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentSpec:
        """Build and validate a spec from a plain dict; missing keys take defaults."""
        if not isinstance(data, dict):
            raise SpecError("<spec>", f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(unknown[0], f"unknown field; known fields: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> str:
        """Compact JSON text of `to_dict()`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AugmentSpec:
        """Parse JSON text into a validated spec."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError("<spec>", f"not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _coerce(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields to change: lists (from JSON) become tuples; an int `size` means a square."""
    out = {}
    for key, value in fields.items():
        if key == "size" and isinstance(value, int) and not isinstance(value, bool):
            out[key] = (value, value)
        elif isinstance(value, list):
            out[key] = tuple(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(name, f"expected one of {', '.join(allowed)}, got {clip(value)}")


def _range(
    name: str, value: Any, low: float, high: float, *, open_low: bool = False
) -> None:
    """A (lo, hi) pair of finite numbers with low <= lo <= hi <= high (low excluded if open)."""
    bound = f"{'(' if open_low else '['}{low}, {high}]"
    if not (isinstance(value, tuple) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise SpecError(name, f"expected a pair (lo, hi) of numbers in {bound}, got {value!r}")
    lo, hi = value
    if lo > hi:
        raise SpecError(name, f"expected lo <= hi, got {value!r}")
    if (lo <= low if open_low else lo < low) or hi > high:
        raise SpecError(name, f"expected values in {bound}, got {value!r}")
