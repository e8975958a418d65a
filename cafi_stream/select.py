"""Stages 7-8: CAFI ranking and per-track top-k in bounded memory.

Faces under the SER-FIQ threshold are dropped; the rest are ranked by IQA (or by SER-FIQ with `--iqa none`).
Each track holds a SER-FIQ histogram (fixed size) and a pool of at most topk * pool_factor candidates, the best of
each quarter of `min_gap` seconds, so memory is O(tracks x k) however long a track lasts. The top-k are the best
face and the set of others `min_gap` apart that fills the most places with the highest total score.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .fusion import NAMES, FusionModel, RunningStats, TrackScores

_BINS = 2048   # SER-FIQ histogram resolution over [0, 1]: quantiles to 0.0005
# Pool slots per min_gap: any set of faces min_gap apart has a candidate within a quarter gap of each of its faces.
SLOTS_PER_GAP = 4
_IQA = np.array([n == "iqa" for n in NAMES])   # the IQA signal's place in a fusion signal vector


@dataclass(frozen=True, eq=False)   # pools hold faces by identity; numpy fields make field equality meaningless
class ScoredFace:
    """One scored face; later stages add to it with `dataclasses.replace`, never in place."""

    track_id: int
    frame_index: int
    pts_time: float
    bbox: np.ndarray          # (4,) xyxy source box
    det_score: float
    landmarks: np.ndarray     # (5, 2) source pixels
    serfiq: float
    embedding: np.ndarray     # (E,) L2-normalised
    iqa: float | None         # raw metric value (None when IQA is off or was not spent on this face)
    score: float              # ranking key, higher is better (set by the Selector from `quality`)
    sharpness: float = 0.0    # Laplacian variance of the aligned face (the `sharpness` baseline ranks by it)
    proxy: float = 0.0        # cheap quality proxy the cascade ranks IQA candidates by (Selector.proxy)
    yaw: float = 0.0
    crops: object = None      # align.FaceCrops, encoded only if the face is written
    quality: float = 0.0      # the ranker's measure, higher is better (oriented IQA for cafi)
    pose: str = "frontal"     # frontal | left | right (pose_bin of yaw)
    measures: object = None   # measures.CaptureMeasures
    typicality: float | None = None     # fusion.Centroids: cosine to its track's earlier faces' mean embedding
    signals: np.ndarray | None = None   # fusion.signal_vector of the scores so far (set by the pipeline)


POSES = ("frontal", "left", "right")


def pose_bin(yaw: float, frontal_yaw: float) -> str:
    """Pose bin of a yaw ratio (cascade.yaw_ratio): "left"/"right" are the side the nose points to in the image."""
    if abs(yaw) <= frontal_yaw:
        return "frontal"
    return "right" if yaw > 0 else "left"


def pick_diverse(ranked: list, topk: int, fits: Callable[[object, list], bool],
                 pose: Callable[[object], str] | None = None, score: Callable[[object], float] | None = None,
                 max_nodes: int = 20000) -> list:
    """Top-k of `ranked` (best first) where every pick `fits` the others. Best first.

    With `pose`, the best fitting item of each pose bin is taken first (bins in the order of their best item), then
    the best that fit. Otherwise the best item is always kept, and with `score` the others are the set that fills
    the most places with the highest total score (a branch and bound over at most `max_nodes` sets, from the
    greedy answer): taken one by one, the second best can rule out two good faces, one on either side of it in
    time, and leave the last place to a poor one."""
    kept: list = []
    if pose is not None:
        for p in dict.fromkeys(pose(x) for x in ranked):
            x = next((x for x in ranked if pose(x) == p and fits(x, kept)), None)
            if x is not None and len(kept) < topk:
                kept.append(x)
    for x in ranked:
        if len(kept) == topk:
            break
        if not any(x is k for k in kept) and fits(x, kept):
            kept.append(x)
    if pose is None and score is not None and len(kept) > 1:
        kept = _best_set(ranked, topk, fits, score, kept, max_nodes)
    order = {id(x): i for i, x in enumerate(ranked)}
    return sorted(kept, key=lambda x: order[id(x)])


def _best_set(ranked: list, topk: int, fits, score, greedy: list, max_nodes: int) -> list:
    """The best item and the fitting set of the others with the most items, then the highest total score."""
    rest = [x for x in ranked[1:] if fits(x, ranked[:1])]
    values = [float(score(x)) for x in rest]
    best, best_key = list(greedy), (len(greedy), sum(float(score(x)) for x in greedy))
    chosen, nodes = ranked[:1], 0

    def search(start: int, total: float) -> None:
        nonlocal best, best_key, nodes
        nodes += 1
        if (len(chosen), total) > best_key:
            best, best_key = list(chosen), (len(chosen), total)
        need = topk - len(chosen)
        for j in range(start, len(rest)):
            if not need or nodes > max_nodes:
                return
            # `rest` is best first: what is left from j bounds both the count and the total reachable.
            if (len(chosen) + min(need, len(rest) - j), total + sum(values[j:j + need])) <= best_key:
                return
            if fits(rest[j], chosen):
                chosen.append(rest[j])
                search(j + 1, total + values[j])
                chosen.pop()

    search(0, float(score(ranked[0])))
    return best


@dataclass(frozen=True)
class KeptFace:
    face: ScoredFace
    rank: int   # 1..k


@dataclass(frozen=True)
class TrackResult:
    """What the pipeline gives for one track: its kept faces, best first. `final` when the track (or the input)
    ended; otherwise a snapshot of a track still open on a live source, which a later result replaces."""

    track_id: int
    span: tuple[float, float]   # first and last time it was detected
    faces: tuple[KeptFace, ...]
    final: bool = True


@dataclass
class SerfiqRule:
    """A face passes when serfiq >= min_score and >= the track's `quantile` of SER-FIQ so far (0: off)."""

    quantile: float = 0.5
    min_score: float | None = None

    def threshold(self, hist: np.ndarray) -> float:
        t = self.min_score if self.min_score is not None else 0.0
        total = hist.sum()
        if self.quantile > 0 and total:
            b = int(np.searchsorted(np.cumsum(hist), self.quantile * total, side="right"))
            t = max(t, b / _BINS)   # lower edge of the quantile's bin: ties at the edge pass
        return t


class Running:
    """Mean and standard deviation in O(1) memory (Welford)."""

    def __init__(self):
        self.n, self.mean, self._m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self._m2 += d * (x - self.mean)

    def z(self, x: float) -> float:
        std = (self._m2 / self.n) ** 0.5 if self.n > 1 else 0.0
        return (x - self.mean) / std if std > 1e-12 else 0.0


class TrackPool:
    """A track's candidates: the best face of each `slot` seconds of the track (slots fixed in time, so that a run
    of ever better faces cannot carry one slot's face along and leave the seconds it passed without a candidate),
    at most `capacity` of them, or with `by_pose` at most `capacity` per pose bin. When full, the face that scores
    least on the track's statistics now (`now`) leaves."""

    def __init__(self, capacity: int, slot: float, by_pose: bool = False):
        self.capacity = capacity
        self.slot = slot
        self.by_pose = by_pose
        self.hist = np.zeros(_BINS, np.int32)
        self.serfiq = Running()
        self.quality = Running()
        self.signals = RunningStats()
        self._slots: dict[float, ScoredFace] = {}

    @property
    def faces(self) -> list[ScoredFace]:
        return list(self._slots.values())

    def observe(self, serfiq: float) -> None:
        self.hist[min(_BINS - 1, max(0, int(serfiq * _BINS)))] += 1
        self.serfiq.add(serfiq)

    def offer(self, face: ScoredFace, now: Callable[[ScoredFace], float] | None = None) -> bool:
        """Keep `face` if it beats its slot's face, and, when the pool is full, the face that scores least now."""
        key = face.pts_time // self.slot if self.slot > 0 else face.pts_time
        held = self._slots.get(key)
        if held is not None:
            if held.score >= face.score and held.frame_index != face.frame_index:
                return False
            self._slots[key] = face
            return True
        now = now or (lambda f: f.score)
        same = [k for k, f in self._slots.items() if not self.by_pose or f.pose == face.pose]
        if len(same) >= self.capacity:
            worst = min(same, key=lambda k: now(self._slots[k]))
            if now(face) <= now(self._slots[worst]):
                return False
            del self._slots[worst]
        self._slots[key] = face
        return True


class Selector:
    """`fusion` "learned": rank by `model` (fusion.FusionModel) over SER-FIQ, IQA and the capture measures.
    "filter": SER-FIQ rule, then rank by quality. "zsum" / "zmin": rank by the sum / the smaller of the per-track
    z-scores of SER-FIQ and quality. Only "filter" drops faces by the track's rule (`rule.min_score` always
    applies); with "learned", a face scored more than `max_drop` under its track's best is not kept."""

    def __init__(self, topk: int, min_gap: float, rule: SerfiqRule, pool_factor: int = 3, fusion: str = "filter",
                 max_similarity: float = 1.0, pose_bins: bool = False, model: FusionModel | None = None,
                 max_drop: float = 0.0):
        if fusion == "learned" and model is None:
            raise ValueError("the learned fusion needs its model")
        self.topk = topk
        self.min_gap = min_gap
        self.fusion = fusion
        self.model = model
        self.max_similarity = max_similarity   # cosine between the embeddings of two kept faces (1: off)
        self.pose_bins = pose_bins             # keep the best face of each pose bin first
        self.max_drop = max_drop if fusion == "learned" else 0.0   # the other fusions' scores have no common unit
        self.rule = rule if fusion == "filter" else SerfiqRule(quantile=0.0, min_score=rule.min_score)
        self.capacity = topk * pool_factor
        self.pools: dict[int, TrackPool] = {}
        # Ranked by SER-FIQ: a track's answer when its IQA budget never reached it.
        self.fallback: dict[int, TrackPool] = {}
        # Per track, the signals of every face before its IQA call: the cascade's proxy.
        self.before_iqa = TrackScores(model, ("iqa",)) if model is not None else None

    def _pool(self, track_id: int) -> TrackPool:
        pool = self.pools.get(track_id)
        if pool is None:
            pool = self.pools[track_id] = TrackPool(self.capacity, self.min_gap / SLOTS_PER_GAP, self.pose_bins)
        return pool

    def _fused(self, pool: TrackPool, serfiq: float, quality: float) -> float:
        if self.fusion == "zsum":
            return pool.serfiq.z(serfiq) + pool.quality.z(quality)
        if self.fusion == "zmin":
            return min(pool.serfiq.z(serfiq), pool.quality.z(quality))
        return quality

    def _score(self, pool: TrackPool, face: ScoredFace) -> float:
        if self.fusion == "learned":
            return self.model.score(face.signals, pool.signals)
        return self._fused(pool, face.serfiq, face.quality)

    def judge(self, track_id: int):
        """(threshold, score(face)) of a track with its statistics so far: how `--scores-out` explains each
        face's rank."""
        pool = self._pool(track_id)
        return self.rule.threshold(pool.hist), lambda face: self._score(pool, face)

    def offer_fallback(self, face: ScoredFace) -> bool:
        pool = self.fallback.get(face.track_id)
        if pool is None:
            pool = self.fallback[face.track_id] = TrackPool(self.capacity, self.min_gap / SLOTS_PER_GAP, self.pose_bins)
        return pool.offer(face)

    def proxy(self, face: ScoredFace) -> float:
        """The cascade's proxy for a face scored by SER-FIQ and not yet by IQA: with the learned fusion, its fused
        score with the IQA signal at the track's typical value, against every such face of its track so far (a
        noisy face's detail is high, its fused score is not); otherwise the face's own proxy (`detail`)."""
        if self.fusion != "learned":
            return face.proxy
        self.before_iqa.observe(face.track_id, face.signals)
        return self.before_iqa.score(face.track_id, face.signals)

    def could_enter(self, face: ScoredFace) -> bool:
        """False when the top-k the face's track would keep now (`min_gap` apart) all beat it on the proxy. With
        the learned fusion both sides are scored now, on the track's statistics so far: proxies from different
        moments of a track are not comparable."""
        pool = self.pools.get(face.track_id)
        faces = self._diverse(pool.faces) if pool is not None else []
        if len(faces) < self.topk:
            return True
        if self.fusion != "learned":
            return face.proxy > min(f.proxy for f in faces)
        score = self.before_iqa.score
        return score(face.track_id, face.signals) > min(score(face.track_id, f.signals) for f in faces)

    def passes(self, track_id: int, serfiq: float) -> bool:
        """Record a face's SER-FIQ score; True when it passes the track's threshold (and is worth an IQA call)."""
        pool = self._pool(track_id)
        pool.observe(serfiq)
        return serfiq >= self.rule.threshold(pool.hist)

    def offer(self, face: ScoredFace, provisional: bool = False, seen: bool = False) -> bool:
        """Offer a scored face to its track's pool. `provisional`: before its IQA call (learned fusion: the IQA
        signal at the track's typical value); `seen`: its other signals were offered before, only IQA is new."""
        pool = self._pool(face.track_id)
        if not provisional:
            pool.quality.add(face.quality)
        if self.fusion == "learned":
            x = face.signals
            pool.signals.add(np.where(_IQA, x, np.nan) if seen else x)
        return pool.offer(replace(face, score=self._score(pool, face)), lambda f: self._score(pool, f))

    def close(self, track_id: int) -> list[KeptFace]:
        """End a track: apply the final SER-FIQ threshold and return its top-k, `min_gap` apart, best first."""
        kept = self.peek(track_id)
        self.pools.pop(track_id, None)
        self.fallback.pop(track_id, None)
        if self.before_iqa is not None:
            self.before_iqa.forget(track_id)
        return kept

    def peek(self, track_id: int) -> list[KeptFace]:
        """A track's top-k if it ended now (its best-so-far)."""
        pool = self.pools.get(track_id)
        fallback = self.fallback.get(track_id)
        if pool is None:
            return []
        threshold = self.rule.threshold(pool.hist)
        rescored = [replace(f, score=self._score(pool, f)) for f in pool.faces]   # with final track statistics
        faces = [f for f in rescored if f.serfiq >= threshold]
        if not faces and fallback is not None:
            faces = [f for f in fallback.faces if f.serfiq >= threshold]
        if self.max_drop and faces:
            best = max(f.score for f in faces)
            faces = [f for f in faces if f.score >= best - self.max_drop]
        return [KeptFace(face, rank) for rank, face in enumerate(self._diverse(faces), 1)]

    def _fits(self, face: ScoredFace, kept: list[ScoredFace]) -> bool:
        return all(abs(face.pts_time - k.pts_time) >= self.min_gap and
                   (self.max_similarity >= 1 or float(np.dot(face.embedding, k.embedding)) <= self.max_similarity)
                   for k in kept)

    def _diverse(self, faces: list[ScoredFace]) -> list[ScoredFace]:
        return pick_diverse(sorted(faces, key=lambda f: -f.score), self.topk, self._fits,
                            (lambda f: f.pose) if self.pose_bins else None, score=lambda f: f.score)

    @property
    def open_tracks(self) -> list[int]:
        return sorted(self.pools)
