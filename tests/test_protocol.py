"""Domain objects <-> augsvc.v1 messages: specs, stream requests, dataset descriptions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from augsvc.core.spec import AugmentSpec, SpecError
from augsvc.core.stats import IMAGENET, DatasetStats
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import (
    RequestError,
    StreamRequest,
    dataset_info,
    dataset_summary,
    select_stats_source,
    spec_from_proto,
    spec_to_proto,
    stats_from_proto,
    stats_to_proto,
)

SPECS = [
    AugmentSpec(),
    AugmentSpec.alexnet(),
    AugmentSpec.eval(),
    AugmentSpec().replace(crop="random_crop", size=(192, 160), resize=288, interpolation="cubic",
                          antialias=False, p_vflip=0.25, p_hsv=0.3, hue_shift=(0.0, 0.2),
                          sat_pow=(0.5, 2.0), val_scale=(0.9, 1.1), pca_sigma=0.0,
                          normalize=True, layout="NCHW", dtype="float16", stats="dataset"),
]


def test_every_spec_field_has_a_proto_field_with_presence() -> None:
    spec_fields = {f.name for f in dataclasses.fields(AugmentSpec)}
    descriptor = pb.AugmentSpec.DESCRIPTOR
    assert spec_fields == set(descriptor.fields_by_name)
    for field in descriptor.fields:
        assert field.has_presence, field.name


@pytest.mark.parametrize("spec", SPECS, ids=["default", "alexnet", "eval", "modified"])
def test_spec_roundtrip(spec: AugmentSpec) -> None:
    msg = spec_to_proto(spec)
    assert all(msg.HasField(f.name) for f in pb.AugmentSpec.DESCRIPTOR.fields)  # all explicit
    again = pb.AugmentSpec.FromString(msg.SerializeToString())
    assert spec_from_proto(again) == spec


def test_unset_fields_take_the_defaults() -> None:
    assert spec_from_proto(pb.AugmentSpec()) == AugmentSpec()
    assert spec_from_proto(None) == AugmentSpec()
    msg = pb.AugmentSpec(p_hflip=0.0, pca=False, size=pb.Size(height=128, width=96),
                         sat_shift=pb.Range(lo=-0.2, hi=0.0))
    assert spec_from_proto(msg) == AugmentSpec(p_hflip=0.0, pca=False, size=(128, 96),
                                               sat_shift=(-0.2, 0.0))


def test_explicit_zero_values_are_not_defaults() -> None:
    """Presence: p_hflip=0 and hsv=false are real values, not 'unset'."""
    msg = pb.AugmentSpec(p_hflip=0.0, hsv=False, hue_shift=pb.Range())
    spec = spec_from_proto(pb.AugmentSpec.FromString(msg.SerializeToString()))
    assert (spec.p_hflip, spec.hsv, spec.hue_shift) == (0.0, False, (0.0, 0.0))


@pytest.mark.parametrize(("msg", "field"), [
    (pb.AugmentSpec(crop="zoom"), "crop"),
    (pb.AugmentSpec(crop=""), "crop"),
    (pb.AugmentSpec(size=pb.Size(height=224)), "size"),
    (pb.AugmentSpec(size=pb.Size(height=5000, width=10)), "size"),
    (pb.AugmentSpec(crop="center_crop", resize=100), "resize"),
    (pb.AugmentSpec(scale=pb.Range(lo=0.0, hi=1.0)), "scale"),
    (pb.AugmentSpec(ratio=pb.Range(lo=2.0, hi=1.0)), "ratio"),
    (pb.AugmentSpec(p_hflip=1.5), "p_hflip"),
    (pb.AugmentSpec(p_hsv=float("nan")), "p_hsv"),
    (pb.AugmentSpec(hue_shift=pb.Range(lo=-0.7, hi=0.1)), "hue_shift"),
    (pb.AugmentSpec(val_pow=pb.Range(lo=0.0, hi=2.0)), "val_pow"),
    (pb.AugmentSpec(pca_sigma=-1.0), "pca_sigma"),
    (pb.AugmentSpec(layout="HWC"), "layout"),
    (pb.AugmentSpec(dtype="int8"), "dtype"),
    (pb.AugmentSpec(normalize=True), "dtype"),  # normalize needs a float dtype
    (pb.AugmentSpec(stats="cifar"), "stats"),
    (pb.AugmentSpec(interpolation="lanczos"), "interpolation"),
])
def test_invalid_values_raise_spec_error_naming_the_field(msg: pb.AugmentSpec, field: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_proto(msg)
    assert info.value.field == field
    assert f"AugmentSpec.{field}" in str(info.value)


def test_spec_to_proto_validates() -> None:
    with pytest.raises(SpecError, match="resize"):
        spec_to_proto(AugmentSpec(resize=-3))


# --- StreamBatches requests ------------------------------------------------------


def test_stream_request_roundtrip() -> None:
    req = StreamRequest(dataset="imagenet", spec=AugmentSpec.eval(), seed=2**64 - 1, epoch=3,
                        rank=1, world_size=4, batch_size=256, batches=(5, 2, 9), tail="pad",
                        balance=True, chunk_bytes=1 << 20)
    msg = pb.StreamBatchesRequest.FromString(req.to_proto().SerializeToString())
    assert StreamRequest.from_proto(msg) == req


def test_stream_request_zero_values_read_as_documented() -> None:
    req = StreamRequest.from_proto(pb.StreamBatchesRequest(dataset="d", batch_size=8))
    assert req == StreamRequest(dataset="d", seed=0, epoch=0, batch_size=8)
    assert (req.world_size, req.tail, req.batches, req.spec) == (1, "drop_last", (), AugmentSpec())


@pytest.mark.parametrize(("fields", "name"), [
    ({"dataset": ""}, "dataset"),
    ({"batch_size": 0}, "batch_size"),
    ({"rank": 2, "world_size": 2}, "rank"),
    ({"tail": "wrap"}, "tail"),
])
def test_invalid_stream_request_names_the_field(fields: dict, name: str) -> None:
    msg = pb.StreamBatchesRequest(dataset="d", batch_size=8)
    for key, value in fields.items():
        setattr(msg, key, value)
    with pytest.raises(RequestError) as info:
        StreamRequest.from_proto(msg)
    assert info.value.field == name and f"StreamBatchesRequest.{name}" in str(info.value)


def test_invalid_spec_inside_a_request_is_a_spec_error() -> None:
    msg = pb.StreamBatchesRequest(dataset="d", batch_size=8, spec=pb.AugmentSpec(p_vflip=2.0))
    with pytest.raises(SpecError, match="p_vflip"):
        StreamRequest.from_proto(msg)


def test_stream_request_to_proto_validates() -> None:
    with pytest.raises(RequestError, match="seed"):
        StreamRequest(dataset="d", seed=-1, epoch=0, batch_size=1).to_proto()
    with pytest.raises(RequestError, match="batches"):
        StreamRequest(dataset="d", seed=0, epoch=0, batch_size=1, batches=(1, -2)).to_proto()


# --- datasets and statistics -----------------------------------------------------


def make_stats() -> DatasetStats:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 3))
    return DatasetStats.from_moments(mean=np.array([0.5, 0.4, 0.3]), cov=a @ a.T / 100,
                                     num_images=12, num_pixels=12 * 50 * 40, source="/data/toy")


@pytest.mark.parametrize(("stats", "source"), [(make_stats(), "dataset"), (IMAGENET, "imagenet")])
def test_stats_roundtrip_keeps_eigenvectors_as_columns(stats: DatasetStats, source: str) -> None:
    msg = pb.DatasetStats.FromString(stats_to_proto(stats, source).SerializeToString())
    assert (msg.source, msg.description) == (source, stats.source)
    # the documented layout: row-major, eigenvector k = (v[k], v[3 + k], v[6 + k])
    v = list(msg.eigvecs)
    for k in range(3):
        np.testing.assert_array_equal([v[k], v[3 + k], v[6 + k]], stats.eigvecs[:, k])
    assert list(msg.cov) == stats.cov.reshape(-1).tolist()

    back = stats_from_proto(msg)
    assert isinstance(back, DatasetStats)
    for name in ("mean", "std", "cov", "eigvals", "eigvecs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    assert (back.num_images, back.num_pixels, back.source) == (
        stats.num_images, stats.num_pixels, stats.source)


def test_computed_eigenbasis_survives_the_wire() -> None:
    back = stats_from_proto(stats_to_proto(make_stats(), "dataset"))
    np.testing.assert_allclose(back.cov @ back.eigvecs, back.eigvecs * back.eigvals, atol=1e-12)


@dataclass(frozen=True)
class LookAlike:
    """Any object with DatasetStats' attributes converts (duck typing)."""

    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.2, 0.2, 0.2)
    cov: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3) * 0.04)
    eigvals: tuple = (0.04, 0.04, 0.04)
    eigvecs: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    num_images: int = 1
    num_pixels: int = 4
    source: str = "synthetic"


def test_stats_checks() -> None:
    assert stats_to_proto(LookAlike(), "dataset").description == "synthetic"
    with pytest.raises(ValueError, match="eigvecs"):
        stats_to_proto(LookAlike(eigvecs=np.eye(2)), "dataset")
    with pytest.raises(ValueError, match="source"):
        stats_to_proto(LookAlike(), "web")
    with pytest.raises(ValueError, match="cov"):
        stats_from_proto(pb.DatasetStats(mean=[0] * 3, std=[1] * 3, cov=[0] * 4))


def test_dataset_info_and_summary() -> None:
    info = dataset_info("flowers", 1200, ["daisy", "rose"], IMAGENET, "imagenet",
                        num_rejected=3, stats_sources=["dataset"])
    info = pb.DatasetInfo.FromString(info.SerializeToString())
    assert (info.name, info.num_samples, list(info.classes), info.num_rejected) == (
        "flowers", 1200, ["daisy", "rose"], 3)
    assert info.stats.source == "imagenet" and info.stats.description == IMAGENET.source
    assert list(info.stats_sources) == ["imagenet", "dataset"]
    summary = dataset_summary("flowers", 1200, 2)
    assert (summary.name, summary.num_samples, summary.num_classes) == ("flowers", 1200, 2)


def test_select_stats_source() -> None:
    assert select_stats_source("", ["imagenet", "dataset"]) == "dataset"
    assert select_stats_source("", ["imagenet"]) == "imagenet"
    assert select_stats_source("imagenet", ["imagenet", "dataset"]) == "imagenet"
    with pytest.raises(LookupError, match="available: imagenet"):
        select_stats_source("dataset", ["imagenet"])
    with pytest.raises(ValueError, match="expected one of"):
        select_stats_source("cifar", ["imagenet"])
