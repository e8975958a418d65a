"""Configuration: `configs/default.toml`, overlaid by a user file, overlaid by CLI flags."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError

RANKERS = ("cafi", "serfiq", "sharpness", "detector", "random")
FUSIONS = ("filter", "zsum", "zmin")


@dataclass
class OutputConfig:
    topk: int
    min_gap: float
    context_scale: float
    jpeg_quality: int


@dataclass
class DecodeConfig:
    queue_size: int
    threads: int
    max_frames: int


@dataclass
class DetectConfig:
    min_confidence: float
    box_scale: float
    rate: float


@dataclass
class TrackConfig:
    max_gap: float
    iou_threshold: float
    min_frames: int
    shot_cut: float


@dataclass
class FacesConfig:
    min_face: int
    iqa_size: int
    aligned_size: int


@dataclass
class FrConfig:
    model: str
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
    method: str
    fusion: str


@dataclass
class DiversityConfig:
    max_similarity: float
    pose_bins: bool
    frontal_yaw: float


@dataclass
class IdentityConfig:
    threshold: float
    per: str


@dataclass
class IqaConfig:
    name: str
    dbcnn_dataset: str
    batch: int


@dataclass
class CascadeConfig:
    exhaustive: bool
    min_det_score: float
    max_yaw: float
    min_sharpness: float
    sample_interval: float
    iqa_window: float
    iqa_budget: float
    iqa_burst: float
    max_age: float


@dataclass
class LiveConfig:
    loop: bool
    transport: str
    open_timeout: float
    read_timeout: float
    reconnect_max: int
    backoff_initial: float
    backoff_max: float
    queue_size: int
    status_interval: float
    snapshot_interval: float


@dataclass
class RuntimeConfig:
    device: str
    backend: str
    models_dir: str
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
    sections = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "sources"}
    types = {c.__name__: c for c in (OutputConfig, DecodeConfig, DetectConfig, TrackConfig, FacesConfig, FrConfig,
                                     SerfiqConfig, RankConfig, DiversityConfig, IdentityConfig, IqaConfig,
                                     CascadeConfig, LiveConfig, RuntimeConfig)}
    cfg = Config(**{name: _coerce(types[t], data[name], name) for name, t in sections.items()}, sources=sources)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    checks = [
        (cfg.output.topk >= 1, "topk must be at least 1"),
        (cfg.output.min_gap >= 0, "min-gap must not be negative"),
        (cfg.faces.min_face >= 0, "min-face must not be negative"),
        (0 < cfg.serfiq.dropout < 1, "serfiq dropout must be in (0, 1)"),
        (cfg.serfiq.passes >= 2, "serfiq passes must be at least 2"),
        (0 <= cfg.serfiq.track_quantile < 1, "serfiq track_quantile must be in [0, 1)"),
        (cfg.runtime.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
        (cfg.fr.channel_order in ("", "RGB", "BGR"), "fr channel_order must be RGB or BGR"),
        (cfg.decode.queue_size >= 1, "decode queue_size must be at least 1"),
        (cfg.runtime.pool_factor >= 1, "runtime pool_factor must be at least 1"),
        (cfg.runtime.backend in ("auto", "tensorrt", "ort", "torch"), "backend must be auto, tensorrt, ort or torch"),
        (cfg.runtime.max_batch >= 1, "runtime max_batch must be at least 1"),
        (cfg.detect.rate >= 0, "detect rate must not be negative"),
        (cfg.cascade.iqa_budget > 0, "cascade iqa_budget must be positive"),
        (cfg.live.transport in ("tcp", "udp"), "rtsp transport must be tcp or udp"),
        (cfg.rank.method in RANKERS, f"ranker must be one of {', '.join(RANKERS)}"),
        (cfg.rank.fusion in FUSIONS, f"fusion must be one of {', '.join(FUSIONS)}"),
        (cfg.live.open_timeout > 0 and cfg.live.read_timeout > 0, "timeouts must be positive"),
        (cfg.live.reconnect_max >= -1, "reconnect-max must be -1 (unlimited) or more"),
        (cfg.live.queue_size >= 1, "live queue_size must be at least 1"),
        (cfg.track.max_gap > 0, "track timeout must be positive"),
        (-1 <= cfg.diversity.max_similarity <= 1, "max-similarity must be in [-1, 1]"),
        (-1 <= cfg.identity.threshold <= 1, "identity threshold must be in [-1, 1]"),
        (cfg.identity.per in ("track", "identity"), "per must be track or identity"),
    ]
    if isinstance(cfg.serfiq.min_score, str) and cfg.serfiq.min_score != "auto":
        checks.append((False, "serfiq min_score must be a number or \"auto\""))
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
