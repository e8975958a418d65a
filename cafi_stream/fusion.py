"""Stage 7a: the learned fusion that ranks a track's faces from SER-FIQ, the IQA score, the capture measures and
the face's typicality within its track.

Every signal is oriented so that higher should be better, then turned into a feature on a common scale:
- "relative" signals (whose level depends on the person, the light and the camera: SER-FIQ, IQA, sharpness, ...)
  become a z-score within the track (over its faces so far), clipped to [-3, tau]: far under the track's typical
  value a signal keeps penalising, but above it the signal soon stops helping, so that no face is bought by one
  excellent signal while another says it is broken;
- "absolute" signals (noise in 8-bit levels, JPEG blockiness: physical quantities that blur and light do not push
  past a clean face's level) become a penalty in [-3, 0] under a threshold that clean faces pass.
The score is a weighted sum of the features, with weights that sum to 1, each at most `cap` (no signal decides
alone, whichever IQA model is in use), SER-FIQ and IQA each at least their `floor` (CAFI combines the two
networks), and typicality at least its own (among clean faces, the one that looks most like its person is the one a
recognition dataset needs; the fit itself only learns clean against degraded).

The weights, tau, cap, floor and thresholds live in fusion.json beside this module, versioned, written by
scripts/fit_fusion.py from the fit clips only (that script says which people those are).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PARAMS = Path(__file__).with_name("fusion.json")


@dataclass(frozen=True)
class Signal:
    name: str
    value: Callable[[dict], float | None]   # from the capture measures' dict (with "serfiq" and "iqa" added)
    means: str
    absolute: bool = False                  # a penalty under a fixed threshold, not a z-score within the track


def _log(x, sign: float = 1.0):
    return None if x is None else sign * math.log1p(max(0.0, float(x)))


# The registry: one entry per signal. Higher is better for each, by construction.
SIGNALS = (
    Signal("serfiq", lambda m: m["serfiq"], "SER-FIQ: how stable the face's embedding is (recognisability)"),
    Signal("iqa", lambda m: m["iqa"], "the IQA model's score, oriented so higher is better"),
    Signal("sharpness", lambda m: _log(m["sharpness"]), "log Laplacian variance of the aligned face"),
    Signal("detail", lambda m: _log(m["detail"]), "log Laplacian variance at a coarser scale (sigma 1 px)"),
    Signal("feature_detail", lambda m: _log(m["feature_detail"]), "log detail of the eyes and mouth (occlusion)"),
    Signal("fine_detail", lambda m: _log(m["fine_detail"]), "log noise-corrected Laplacian variance of the central "
           "face in source pixels (mild defocus)"),
    Signal("noise", lambda m: _log(m["noise"], -1.0), "minus log noise sigma (Immerkaer) of the inner face", True),
    Signal("luminance", lambda m: m["luminance_mean"], "mean luma of the inner face"),
    Signal("dynamic_range", lambda m: m["dynamic_range"], "1st-99th percentile luma range"),
    Signal("exposure", lambda m: -(m["under_exposure"] + m["over_exposure"]), "minus the clipped share"),
    Signal("blockiness", lambda m: _log(m["blockiness"] - 1.0, -1.0), "minus log excess 8x8 grid steps", True),
    Signal("uniformity", lambda m: m["illumination_uniformity"], "darker / brighter half of the face"),
    Signal("frontal", lambda m: -abs(m["yaw"]), "minus |yaw|"),
    Signal("eye_span", lambda m: m["eye_span"], "eye distance over eye-to-mouth height (a turn shortens it)"),
    Signal("typicality", lambda m: m["typicality"], "cosine of the embedding to its track's earlier faces' mean "
           "embedding (`Centroids`): how much the face looks like its own person"),
)
NAMES = tuple(s.name for s in SIGNALS)


def ranking_fusion(rank, with_iqa: bool) -> str:
    """The fusion a run ranks by, from its [rank] config: `rank.fusion` for the cafi method ("learned" works
    without an IQA model too; the z-score rules need one); baselines rank by their own measure alone ("filter")."""
    if rank.method == "cafi" and (with_iqa or rank.fusion == "learned"):
        return rank.fusion
    return "filter"


def signal_vector(serfiq: float, iqa: float | None, capture, typicality: float | None = None) -> np.ndarray:
    """The raw oriented signals of one face (NaN where a signal is missing: no IQA call, no measures, no earlier
    face of its track)."""
    m = dict(capture.as_dict(digits=8) if hasattr(capture, "as_dict") else (capture or {}))
    m["serfiq"], m["iqa"], m["typicality"] = serfiq, iqa, typicality
    out = np.full(len(SIGNALS), np.nan)
    for i, s in enumerate(SIGNALS):
        try:
            v = s.value(m)
        except (KeyError, TypeError):
            v = None
        if v is not None and math.isfinite(v):
            out[i] = v
    return out


def row_signals(row: dict) -> np.ndarray:
    """`signal_vector` of a `--scores-out` or metadata.jsonl line (its IQA signal only if the face got an IQA
    call)."""
    return signal_vector(row["serfiq"], row["quality"] if row.get("iqa") is not None else None, row.get("capture"),
                         row.get("typicality"))


def face_row_signals(row) -> np.ndarray:
    """The same for a `rows.FaceRow`."""
    return row_signals({"serfiq": row.serfiq, "quality": row.quality, "iqa": row.iqa, "capture": row.capture,
                        "typicality": row.typicality})


class RunningStats:
    """Per-signal mean and standard deviation in O(1) memory (Welford), NaN entries skipped."""

    def __init__(self, n: int = len(SIGNALS)):
        self.n = np.zeros(n)
        self.mean = np.zeros(n)
        self._m2 = np.zeros(n)

    def add(self, x: np.ndarray) -> None:
        ok = np.isfinite(x)
        self.n[ok] += 1
        d = np.where(ok, x - self.mean, 0.0)
        self.mean[ok] += d[ok] / self.n[ok]
        self._m2[ok] += d[ok] * (x[ok] - self.mean[ok])

    @property
    def level(self) -> np.ndarray:
        """The mean of each signal so far, NaN where none was seen."""
        return np.where(self.n > 0, self.mean, np.nan)

    def z(self, x: np.ndarray) -> np.ndarray:
        """z-scores of `x` under the statistics so far; 0 (the track's typical value) where unknown."""
        std = np.sqrt(np.divide(self._m2, self.n, out=np.zeros_like(self._m2), where=self.n > 1))
        z = np.divide(x - self.mean, std, out=np.zeros_like(self.mean), where=std > 1e-12)
        return np.where(np.isfinite(z), z, 0.0)


ABSOLUTE = np.array([s.absolute for s in SIGNALS])


@dataclass(frozen=True)
class FusionModel:
    version: str
    weights: np.ndarray          # per signal of SIGNALS (0 for one left out)
    tau: float
    thresholds: np.ndarray       # per signal: (threshold, scale) of an absolute signal, NaN for relative ones
    cap: float
    floor: dict[str, float]      # least weight of SER-FIQ, of IQA and of typicality

    @classmethod
    def load(cls, path: Path = PARAMS, iqa: bool = True) -> "FusionModel":
        """The packaged parameters; `iqa=False` takes the weights fitted without an IQA model (--iqa none)."""
        p = _params(str(path))
        weights = p["with_iqa" if iqa else "without_iqa"]
        return cls(version=p["version"], weights=np.array([weights.get(n, 0.0) for n in NAMES]), tau=p["tau"],
                   thresholds=np.array([p["thresholds"].get(n, (np.nan, np.nan)) for n in NAMES], np.float64),
                   cap=p["cap"], floor=p["floor"])

    def features(self, x: np.ndarray, z: np.ndarray, level: np.ndarray) -> np.ndarray:
        """Features (..., signals) from raw signals `x`, their z-scores `z` within the track and the track's mean
        `level` of each. An absolute signal is penalised under its fixed threshold, or under the track's own level
        less one clean standard deviation when that is lower: a source's own grain or compression (a grainy photo,
        a noisy camera) is its baseline, so that the smoother faces of a degraded moment do not outrank it."""
        t, s = self.thresholds[:, 0], self.thresholds[:, 1]
        below = np.divide(np.fmin(t, level - s) - x, s, out=np.zeros_like(z), where=ABSOLUTE & np.isfinite(x))
        return np.where(ABSOLUTE, -np.clip(below, 0.0, 3.0), np.clip(z, -3.0, self.tau))

    def score(self, x: np.ndarray, stats: RunningStats) -> float:
        """One face's score from its raw signals and its track's statistics."""
        return float(self.features(x, stats.z(x), stats.level) @ self.weights)

    def group_features(self, x: np.ndarray) -> np.ndarray:
        """Features of a group of faces' raw signals (faces x signals, one or more), against the group's own
        statistics."""
        stats = group_stats(x)
        return self.features(x, np.stack([stats.z(row) for row in x]), stats.level)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Scores of a group of faces' raw signals, standardised over the group."""
        return self.group_features(x) @ self.weights if len(x) else np.zeros(0)


class TrackScores:
    """Per track, the statistics of every face seen so far, and a face's fused score against them with the signals
    in `leave_out` at the track's typical value: how the cascade judges faces that do not have every signal yet.
    Two faces are compared on the statistics of now, since a track's statistics move."""

    def __init__(self, model: FusionModel, leave_out: tuple[str, ...] = ()):
        self.model = model
        self._out = np.isin(NAMES, leave_out)
        self._stats: dict[int, RunningStats] = {}

    def observe(self, track_id: int, x: np.ndarray) -> None:
        self._stats.setdefault(track_id, RunningStats()).add(x)

    def score(self, track_id: int, x: np.ndarray) -> float:
        return self.model.score(np.where(self._out, np.nan, x), self._stats.get(track_id) or RunningStats())

    def forget(self, track_id: int) -> None:
        self._stats.pop(track_id, None)


class Centroids:
    """Per track, the sum of its faces' unit embeddings. A face's typicality is its cosine to the mean of the
    track's earlier faces: a face unlike its own person (an odd pose or expression, a hand over it, blur the network
    reads as another face) sits far from it, and a frontal, typical face near it is what a comparison with other
    photos of the person needs (on lia_vox_obama.mov, Spearman 0.67 with the genuine cosine to the Obama photos)."""

    def __init__(self):
        self._sum: dict[int, np.ndarray] = {}

    def typicality(self, track_id: int, embedding: np.ndarray) -> float | None:
        """The face's typicality (None for a track's first face), then the face joins its track's mean."""
        e = np.asarray(embedding, np.float64)
        s = self._sum.get(track_id)
        self._sum[track_id] = e if s is None else s + e   # a new array: the caller's embedding is never changed
        n = 0.0 if s is None else float(np.linalg.norm(s))
        return float(e @ s) / n if n > 0 else None

    def forget(self, track_id: int) -> None:
        self._sum.pop(track_id, None)


@functools.lru_cache(maxsize=4)
def _params(path: str) -> dict:
    """The parameter file, read once per process (identity-level ranking loads the model per identity)."""
    return json.loads(Path(path).read_text())


def group_stats(x: np.ndarray) -> RunningStats:
    """The statistics of the rows of `x` (faces x signals)."""
    stats = RunningStats(x.shape[1])
    for row in x:
        stats.add(row)
    return stats
