"""Configuration: `configs/default.toml`, overlaid by a user file, overlaid by CLI flags."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError

RANKERS = ("cafi", "serfiq", "sharpness", "detector", "random")
FUSIONS = ("learned", "filter", "zsum", "zmin")
LANDMARK_SOURCES = ("auto", "keypoints", "mesh")
PRECISIONS = ("fp32", "int8")   # the ONNX detectors' weights and activations


def option(flag: str, help: str, group: str = "", single: bool = False, engines: bool = False) -> Any:
    """A config key that is also a command-line flag, declared once, here: cli.py builds its parsers from these
    (type from the annotation, choices from _CHOICES, the default from default.toml). `group`: the --help section;
    `single`: single-source runs only (not `batch`); `engines`: also a flag of `engines build`."""
    return field(metadata={"flag": flag, "help": help, "group": group, "single": single, "engines": engines})


@dataclass
class OutputConfig:
    topk: int = option("--topk", "faces kept per track, or per identity with --per identity")
    min_gap: float = option("--min-gap", "least seconds between kept faces of one track")
    context_scale: float
    jpeg_quality: int


@dataclass
class DecodeConfig:
    queue_size: int
    threads: int
    max_frames: int = option("--max-frames", "stop after this many frames (0: read the whole input)")


@dataclass
class DetectConfig:
    model: str = option("--detector", "face detector: scrfd_2.5g, yunet, mediapipe, or one of their files",
                        engines=True)
    min_confidence: float
    rate: float
    size: int
    min_size: int
    face_px: int
    refine_px: int
    batch: int
    ahead: int
    landmarks: str
    precision: str


@dataclass
class TrackConfig:
    max_gap: float = option("--track-timeout", "seconds unseen before a track is closed and written",
                             group="live")
    iou_threshold: float
    min_frames: int
    shot_cut: float


@dataclass
class FacesConfig:
    min_face: int = option("--min-face", "least face box side in source pixels to score")
    iqa_size: int
    aligned_size: int


@dataclass
class FrConfig:
    model: str = option("--fr-model", "face-recognition model: a registry name or an ONNX file", engines=True)
    channel_order: str
    mean: float
    std: float


@dataclass
class SerfiqConfig:
    passes: int
    dropout: float
    seed: int
    track_quantile: float
    min_score: str | float
    batch: int


@dataclass
class RankConfig:
    method: str = option("--ranker", "how faces are ranked (cafi is the product; the others are baselines)")
    fusion: str = option("--fusion", "how cafi combines its signals")
    max_drop: float = option("--max-drop", "learned fusion: a face scored more than this under its track's best "
                             "is not kept, even if the top-k has room (0: off)")


@dataclass
class DiversityConfig:
    max_similarity: float = option("--max-similarity", "largest embedding cosine between two kept faces of a "
                                   "track (1: off)", group="dataset")
    pose_bins: bool = option("--pose-bins", "keep the best frontal, left and right face of a track first",
                              group="dataset")
    frontal_yaw: float


@dataclass
class IdentityConfig:
    threshold: float = option("--identity-threshold", "least average embedding cosine between two tracks of "
                              "one identity", group="dataset")
    per: str = option("--per", "keep the top-k per track or per identity", group="dataset")


@dataclass
class IqaConfig:
    name: str = option("--iqa", "dbcnn, any pyiqa no-reference metric, or none (rank by SER-FIQ)", engines=True)
    dbcnn_dataset: str
    batch: int


@dataclass
class CascadeConfig:
    exhaustive: bool = option("--exhaustive", "score every eligible face with the IQA model (slow; the "
                              "cascade's reference)")
    min_det_score: float
    max_yaw: float
    min_sharpness: float
    sample_interval: float
    serfiq_window: float
    iqa_window: float
    iqa_budget: float
    iqa_burst: float
    max_age: float


@dataclass
class LiveConfig:
    loop: bool = option("--loop", "play a file as a live source at its native rate, looping", group="live",
                         single=True)
    transport: str = option("--rtsp-transport", "RTSP transport", group="live")
    open_timeout: float = option("--open-timeout", "seconds a connection may take to open", group="live")
    read_timeout: float = option("--read-timeout", "seconds without data before reconnecting", group="live")
    reconnect_max: int = option("--reconnect-max", "failed connection attempts in a row before exiting with "
                                "code 3 (-1: unlimited)", group="live")
    backoff_initial: float
    backoff_max: float
    queue_size: int
    status_interval: float
    snapshot_interval: float


@dataclass
class RuntimeConfig:
    device: str = option("--device", "where torch and ONNX Runtime run", engines=True)
    backend: str = option("--backend", "inference backend for the scoring networks (auto: the fastest "
                          "available)", engines=True)
    models_dir: str = option("--models-dir", "where model files are found and downloaded to (\"\": "
                             "$CAFI_MODELS_DIR, else ~/.cache/cafi-stream/models)", engines=True)
    pool_factor: int
    max_batch: int
    max_wait_ms: float


@dataclass
class Config:
    output: OutputConfig
    decode: DecodeConfig
    detect: DetectConfig
    track: TrackConfig
    faces: FacesConfig
    fr: FrConfig
    serfiq: SerfiqConfig
    rank: RankConfig
    diversity: DiversityConfig
    identity: IdentityConfig
    iqa: IqaConfig
    cascade: CascadeConfig
    live: LiveConfig
    runtime: RuntimeConfig
    sources: list[str] = field(default_factory=list)  # files this config was read from

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("sources")
        return d


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for key, value in over.items():
        if key not in base:
            raise InputError(f"{where}: unknown config key '{key}'")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise InputError(f"{where}: '{key}' must be a table")
            out[key] = _merge(base[key], value, where)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"config file {path} is a folder") from None
    except OSError as e:
        raise InputError(f"config file {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"config file {path} is not valid TOML: {e}") from None


def _coerce(cls: type, values: dict, section: str) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = values[f.name]
        if f.type == "int" and not isinstance(v, bool) and isinstance(v, (int, float)) and float(v).is_integer():
            v = int(v)
        elif f.type == "float" and not isinstance(v, bool) and isinstance(v, (int, float)):
            v = float(v)
        elif f.type == "bool" and isinstance(v, bool):
            pass
        elif f.type == "str" and isinstance(v, str):
            pass
        elif f.type == "str | float" and isinstance(v, (str, int, float)) and not isinstance(v, bool):
            pass
        else:
            raise InputError(f"config [{section}] {f.name} = {v!r} is not a valid {f.type}")
        kwargs[f.name] = v
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read the packaged defaults, overlay `path` (a partial TOML file) and then `overrides` ({section: {key: v}})."""
    data = tomllib.loads(resources.files(__package__).joinpath("default.toml").read_text())
    sources = ["default.toml"]
    if path is not None:
        data = _merge(data, _read_toml(Path(path)), str(path))
        sources.append(str(path))
    if overrides:
        data = _merge(data, {k: v for k, v in overrides.items() if v}, "command line")
    cfg = Config(**{name: _coerce(cls, data[name], name) for name, cls in _sections().items()}, sources=sources)
    _validate(cfg)
    return cfg


def _sections() -> dict[str, type]:
    """Config section name -> its dataclass."""
    types = {c.__name__: c for c in (OutputConfig, DecodeConfig, DetectConfig, TrackConfig, FacesConfig, FrConfig,
                                     SerfiqConfig, RankConfig, DiversityConfig, IdentityConfig, IqaConfig,
                                     CascadeConfig, LiveConfig, RuntimeConfig)}
    return {f.name: types[f.type] for f in dataclasses.fields(Config) if f.name != "sources"}


def cli_options() -> list[tuple[str, dataclasses.Field]]:
    """(section, field) of every config key that is also a command-line flag (`option`), in declaration order."""
    return [(name, f) for name, cls in _sections().items() for f in dataclasses.fields(cls) if "flag" in f.metadata]


def choices(section: str, key: str) -> tuple[str, ...] | None:
    """The values a text option allows, where it has a fixed set."""
    return _CHOICES.get((section, key))


# (section, key): (lowest, highest) allowed, inclusive; None leaves that side open. Every numeric option is here.
_RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("output", "topk"): (1, None), ("output", "min_gap"): (0, None), ("output", "context_scale"): (1, 8),
    ("output", "jpeg_quality"): (1, 100),
    ("decode", "queue_size"): (1, None), ("decode", "threads"): (0, 256), ("decode", "max_frames"): (0, None),
    ("detect", "min_confidence"): (0, 1), ("detect", "rate"): (0, None),
    ("detect", "size"): (64, 4096), ("detect", "batch"): (1, 256), ("detect", "ahead"): (0, 256),
    ("detect", "min_size"): (0, 4096), ("detect", "face_px"): (0, 1024), ("detect", "refine_px"): (0, 1024),
    ("track", "max_gap"): (1e-3, None), ("track", "iou_threshold"): (0, 0.999), ("track", "min_frames"): (1, None),
    ("track", "shot_cut"): (0, 1),
    ("faces", "min_face"): (0, None), ("faces", "iqa_size"): (32, 2048), ("faces", "aligned_size"): (32, 1024),
    ("serfiq", "passes"): (2, 10000), ("serfiq", "dropout"): (1e-6, 1 - 1e-6), ("serfiq", "track_quantile"): (0, 0.999),
    ("serfiq", "batch"): (1, None),
    ("diversity", "max_similarity"): (-1, 1), ("diversity", "frontal_yaw"): (0, None),
    ("identity", "threshold"): (-1, 1), ("rank", "max_drop"): (0, None),
    ("iqa", "batch"): (1, None),
    ("cascade", "min_det_score"): (0, 1), ("cascade", "max_yaw"): (0, None), ("cascade", "min_sharpness"): (0, None),
    ("cascade", "sample_interval"): (0, None), ("cascade", "serfiq_window"): (0, None),
    ("cascade", "iqa_window"): (0, None),
    ("cascade", "iqa_budget"): (1e-6, None), ("cascade", "iqa_burst"): (1, None), ("cascade", "max_age"): (0, None),
    ("live", "open_timeout"): (1e-3, 86400), ("live", "read_timeout"): (1e-3, 86400), ("live", "reconnect_max"): (-1, None),
    ("live", "backoff_initial"): (0, 3600), ("live", "backoff_max"): (0, 3600), ("live", "queue_size"): (1, None),
    ("live", "status_interval"): (1e-3, None), ("live", "snapshot_interval"): (0, None),
    ("runtime", "pool_factor"): (1, None), ("runtime", "max_batch"): (1, 4096), ("runtime", "max_wait_ms"): (0, 60000),
}
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("runtime", "device"): ("auto", "cpu", "cuda"), ("runtime", "backend"): ("auto", "tensorrt", "ort", "torch"),
    ("fr", "channel_order"): ("", "RGB", "BGR"), ("live", "transport"): ("tcp", "udp"),
    ("rank", "method"): RANKERS, ("rank", "fusion"): FUSIONS, ("identity", "per"): ("track", "identity"),
    ("detect", "landmarks"): LANDMARK_SOURCES, ("detect", "precision"): PRECISIONS,
}


def _validate(cfg: Config) -> None:
    """Every value in range, before anything is opened or loaded; one line names the key and what it allows."""
    def bad(section: str, key: str, value, allowed: str):
        raise InputError(f"config [{section}] {key} = {value!r}: {allowed}")

    for (section, key), (lo, hi) in _RANGES.items():
        v = getattr(getattr(cfg, section), key)
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            bad(section, key, v, "must be " + (f"between {lo:g} and {hi:g}" if lo is not None and hi is not None
                                               else f"at least {lo:g}" if lo is not None else f"at most {hi:g}"))
    for (section, key), options in _CHOICES.items():
        v = getattr(getattr(cfg, section), key)
        if v not in options:
            bad(section, key, v, f"must be one of {', '.join(repr(o) for o in options)}")
    m = cfg.serfiq.min_score
    if not (m == "auto" or (not isinstance(m, str) and 0 <= m <= 1)):
        bad("serfiq", "min_score", m, 'must be a number in [0, 1] or "auto"')
    if cfg.iqa.name == "dbcnn" and cfg.faces.iqa_size % 16:   # the two branches' feature maps must agree
        bad("faces", "iqa_size", cfg.faces.iqa_size, "DBCNN needs a multiple of 16")
    if cfg.live.backoff_max < cfg.live.backoff_initial:
        bad("live", "backoff_max", cfg.live.backoff_max, "must be at least backoff_initial")
