"""AugmentSpec: defaults, presets, validation messages, JSON round-trip."""

from __future__ import annotations

import json

import pytest

from augsvc.core.spec import AugmentSpec, SpecError


def test_defaults_are_the_design_table() -> None:
    s = AugmentSpec.alexnet()
    assert s.crop == "random_resized_crop" and s.size == (224, 224)
    assert s.scale == (0.08, 1.0) and s.ratio == (3 / 4, 4 / 3)
    assert (s.p_hflip, s.p_vflip, s.p_hsv) == (0.5, 0.0, 1.0)
    assert s.sat_pow == s.val_pow == (0.25, 4.0)
    assert s.sat_scale == s.val_scale == (0.7, 1.4)
    assert s.sat_shift == s.val_shift == s.hue_shift == (-0.1, 0.1)
    assert s.pca and s.pca_sigma == 0.1 and not s.normalize
    assert s.validate() is s


def test_eval_preset_has_no_random_ops() -> None:
    s = AugmentSpec.eval()
    assert s.crop == "center_crop" and s.p_hflip == 0 and s.p_vflip == 0
    assert not s.colour


@pytest.mark.parametrize("spec", [AugmentSpec.alexnet(), AugmentSpec.eval(),
                                  AugmentSpec(size=(160, 128), layout="NCHW", dtype="float16",
                                              normalize=True, crop="random_crop", resize=200)])
def test_json_round_trip(spec: AugmentSpec) -> None:
    text = spec.to_json()
    assert json.loads(text) == spec.to_dict()
    assert AugmentSpec.from_json(text) == spec


def test_from_dict_fills_defaults_and_accepts_square_size() -> None:
    s = AugmentSpec.from_dict({"size": 96, "p_hflip": 0.0})
    assert s.size == (96, 96) and s.p_hflip == 0.0 and s.crop == "random_resized_crop"


def test_replace_does_not_mutate() -> None:
    base = AugmentSpec()
    changed = base.replace(pca=False)
    assert base.pca and not changed.pca


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"crop": "zoom"}, "crop", "random_resized_crop, random_crop, center_crop"),
        ({"size": [0, 10]}, "size", "integers in [1"),
        ({"scale": [0.5, 0.1]}, "scale", "lo <= hi"),
        ({"scale": [0.0, 1.0]}, "scale", "(0.0, 1.0]"),
        ({"ratio": [1.0]}, "ratio", "pair"),
        ({"p_hflip": 1.5}, "p_hflip", "probability in [0, 1]"),
        ({"p_hsv": "yes"}, "p_hsv", "probability"),
        ({"sat_pow": [0.0, 4.0]}, "sat_pow", "(0.0, 16.0]"),
        ({"hue_shift": [-0.1, 0.9]}, "hue_shift", "[-0.5, 0.5]"),
        ({"val_shift": [float("nan"), 0.1]}, "val_shift", "numbers"),
        ({"pca_sigma": -1}, "pca_sigma", "[0, 10]"),
        ({"layout": "HWC"}, "layout", "NHWC, NCHW"),
        ({"dtype": "int8"}, "dtype", "uint8, float16, float32"),
        ({"normalize": True}, "dtype", "float16 or float32"),
        ({"crop": "center_crop", "resize": 100}, "resize", "resize >= 224"),
        ({"hsv": 1}, "hsv", "true or false"),
        ({"stats": "mine"}, "stats", "imagenet, dataset"),
        ({"colour_jitter": 0.4}, "colour_jitter", "unknown field"),
    ],
)
def test_invalid_specs_name_the_field(changes: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        AugmentSpec.from_dict(changes)
    assert info.value.field == field
    assert f"AugmentSpec.{field}" in str(info.value)
    assert words in str(info.value)
    if field != "colour_jitter":  # an unknown keyword is Python's TypeError, not a field
        for make in (lambda: AugmentSpec(**changes), lambda: AugmentSpec().replace(**changes)):
            with pytest.raises(SpecError, match=f"AugmentSpec.{field}"):
                make()


def test_construction_validates_at_once() -> None:
    with pytest.raises(SpecError, match="p_hflip: expected a probability") as info:
        AugmentSpec(p_hflip=2)
    assert info.value.field == "p_hflip"


def test_construction_coerces_lists_and_square_size() -> None:
    s = AugmentSpec(size=96, scale=[0.5, 1.0])  # type: ignore[arg-type]
    assert s.size == (96, 96) and s.scale == (0.5, 1.0)
    assert hash(s) == hash(AugmentSpec(size=(96, 96), scale=(0.5, 1.0)))


def test_bad_json_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="not valid JSON"):
        AugmentSpec.from_json("{crop:")
    with pytest.raises(SpecError, match="JSON object"):
        AugmentSpec.from_dict([1, 2])  # type: ignore[arg-type]
