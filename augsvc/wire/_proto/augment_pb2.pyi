from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetSummary]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetSummary, _Mapping]]] = ...) -> None: ...

class DatasetSummary(_message.Message):
    __slots__ = ("name", "num_samples", "num_classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_samples: int
    num_classes: int
    def __init__(self, name: _Optional[str] = ..., num_samples: _Optional[int] = ..., num_classes: _Optional[int] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("name", "stats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    stats: str
    def __init__(self, name: _Optional[str] = ..., stats: _Optional[str] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "num_samples", "classes", "num_rejected", "stats", "stats_sources", "class_counts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    NUM_REJECTED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STATS_SOURCES_FIELD_NUMBER: _ClassVar[int]
    CLASS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_samples: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    num_rejected: int
    stats: DatasetStats
    stats_sources: _containers.RepeatedScalarFieldContainer[str]
    class_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., num_samples: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., num_rejected: _Optional[int] = ..., stats: _Optional[_Union[DatasetStats, _Mapping]] = ..., stats_sources: _Optional[_Iterable[str]] = ..., class_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class DatasetStats(_message.Message):
    __slots__ = ("source", "mean", "std", "cov", "eigvals", "eigvecs", "num_images", "num_pixels", "description")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    COV_FIELD_NUMBER: _ClassVar[int]
    EIGVALS_FIELD_NUMBER: _ClassVar[int]
    EIGVECS_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_PIXELS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    source: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    cov: _containers.RepeatedScalarFieldContainer[float]
    eigvals: _containers.RepeatedScalarFieldContainer[float]
    eigvecs: _containers.RepeatedScalarFieldContainer[float]
    num_images: int
    num_pixels: int
    description: str
    def __init__(self, source: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., cov: _Optional[_Iterable[float]] = ..., eigvals: _Optional[_Iterable[float]] = ..., eigvecs: _Optional[_Iterable[float]] = ..., num_images: _Optional[int] = ..., num_pixels: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("lo", "hi")
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    lo: float
    hi: float
    def __init__(self, lo: _Optional[float] = ..., hi: _Optional[float] = ...) -> None: ...

class Size(_message.Message):
    __slots__ = ("height", "width")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class AugmentSpec(_message.Message):
    __slots__ = ("crop", "size", "scale", "ratio", "resize", "interpolation", "antialias", "p_hflip", "p_vflip", "hsv", "p_hsv", "hue_shift", "sat_pow", "sat_scale", "sat_shift", "val_pow", "val_scale", "val_shift", "pca", "pca_sigma", "normalize", "layout", "dtype", "stats", "corrupt")
    CROP_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    ANTIALIAS_FIELD_NUMBER: _ClassVar[int]
    P_HFLIP_FIELD_NUMBER: _ClassVar[int]
    P_VFLIP_FIELD_NUMBER: _ClassVar[int]
    HSV_FIELD_NUMBER: _ClassVar[int]
    P_HSV_FIELD_NUMBER: _ClassVar[int]
    HUE_SHIFT_FIELD_NUMBER: _ClassVar[int]
    SAT_POW_FIELD_NUMBER: _ClassVar[int]
    SAT_SCALE_FIELD_NUMBER: _ClassVar[int]
    SAT_SHIFT_FIELD_NUMBER: _ClassVar[int]
    VAL_POW_FIELD_NUMBER: _ClassVar[int]
    VAL_SCALE_FIELD_NUMBER: _ClassVar[int]
    VAL_SHIFT_FIELD_NUMBER: _ClassVar[int]
    PCA_FIELD_NUMBER: _ClassVar[int]
    PCA_SIGMA_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    crop: str
    size: Size
    scale: Range
    ratio: Range
    resize: int
    interpolation: str
    antialias: bool
    p_hflip: float
    p_vflip: float
    hsv: bool
    p_hsv: float
    hue_shift: Range
    sat_pow: Range
    sat_scale: Range
    sat_shift: Range
    val_pow: Range
    val_scale: Range
    val_shift: Range
    pca: bool
    pca_sigma: float
    normalize: bool
    layout: str
    dtype: str
    stats: str
    corrupt: str
    def __init__(self, crop: _Optional[str] = ..., size: _Optional[_Union[Size, _Mapping]] = ..., scale: _Optional[_Union[Range, _Mapping]] = ..., ratio: _Optional[_Union[Range, _Mapping]] = ..., resize: _Optional[int] = ..., interpolation: _Optional[str] = ..., antialias: _Optional[bool] = ..., p_hflip: _Optional[float] = ..., p_vflip: _Optional[float] = ..., hsv: _Optional[bool] = ..., p_hsv: _Optional[float] = ..., hue_shift: _Optional[_Union[Range, _Mapping]] = ..., sat_pow: _Optional[_Union[Range, _Mapping]] = ..., sat_scale: _Optional[_Union[Range, _Mapping]] = ..., sat_shift: _Optional[_Union[Range, _Mapping]] = ..., val_pow: _Optional[_Union[Range, _Mapping]] = ..., val_scale: _Optional[_Union[Range, _Mapping]] = ..., val_shift: _Optional[_Union[Range, _Mapping]] = ..., pca: _Optional[bool] = ..., pca_sigma: _Optional[float] = ..., normalize: _Optional[bool] = ..., layout: _Optional[str] = ..., dtype: _Optional[str] = ..., stats: _Optional[str] = ..., corrupt: _Optional[str] = ...) -> None: ...

class StreamBatchesRequest(_message.Message):
    __slots__ = ("dataset", "spec", "seed", "epoch", "rank", "world_size", "batch_size", "batches", "tail", "balance", "chunk_bytes", "shuffle")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    spec: AugmentSpec
    seed: int
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    batches: _containers.RepeatedScalarFieldContainer[int]
    tail: str
    balance: bool
    chunk_bytes: int
    shuffle: bool
    def __init__(self, dataset: _Optional[str] = ..., spec: _Optional[_Union[AugmentSpec, _Mapping]] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., batch_size: _Optional[int] = ..., batches: _Optional[_Iterable[int]] = ..., tail: _Optional[str] = ..., balance: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., shuffle: _Optional[bool] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: BatchHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[BatchHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class BatchHeader(_message.Message):
    __slots__ = ("batch_index", "shape", "dtype", "layout", "labels", "sample_ids", "draw_ids", "payload_bytes", "num_chunks", "dropped", "substituted", "stats_source", "stats_digest")
    BATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAW_IDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SUBSTITUTED_FIELD_NUMBER: _ClassVar[int]
    STATS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    batch_index: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    layout: str
    labels: _containers.RepeatedScalarFieldContainer[int]
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    draw_ids: _containers.RepeatedScalarFieldContainer[int]
    payload_bytes: int
    num_chunks: int
    dropped: _containers.RepeatedCompositeFieldContainer[DroppedSample]
    substituted: _containers.RepeatedCompositeFieldContainer[Substitution]
    stats_source: str
    stats_digest: str
    def __init__(self, batch_index: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., layout: _Optional[str] = ..., labels: _Optional[_Iterable[int]] = ..., sample_ids: _Optional[_Iterable[int]] = ..., draw_ids: _Optional[_Iterable[int]] = ..., payload_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ..., dropped: _Optional[_Iterable[_Union[DroppedSample, _Mapping]]] = ..., substituted: _Optional[_Iterable[_Union[Substitution, _Mapping]]] = ..., stats_source: _Optional[str] = ..., stats_digest: _Optional[str] = ...) -> None: ...

class Substitution(_message.Message):
    __slots__ = ("row", "sample_id", "path", "reason", "substitute_id")
    ROW_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SUBSTITUTE_ID_FIELD_NUMBER: _ClassVar[int]
    row: int
    sample_id: int
    path: str
    reason: str
    substitute_id: int
    def __init__(self, row: _Optional[int] = ..., sample_id: _Optional[int] = ..., path: _Optional[str] = ..., reason: _Optional[str] = ..., substitute_id: _Optional[int] = ...) -> None: ...

class DroppedSample(_message.Message):
    __slots__ = ("sample_id", "path", "reason")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sample_id: int
    path: str
    reason: str
    def __init__(self, sample_id: _Optional[int] = ..., path: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
