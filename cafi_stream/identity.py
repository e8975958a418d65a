"""Identities: tracks clustered by their SER-FIQ embeddings, within a video and across a batch, and the top-k
per identity. Works on metadata rows, so a batch can re-cluster finished videos without re-running them."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from .fusion import FusionModel, face_row_signals
from .rows import FaceRow
from .select import pick_diverse


def cluster(vectors: np.ndarray, threshold: float, cannot: np.ndarray | None = None) -> np.ndarray:
    """Average-linkage agglomerative clustering of unit `vectors` (n, E) by cosine similarity; clusters merge while
    their average pairwise cosine is at least `threshold`, never across a `cannot[i, j]` pair. Returns a label per
    vector (the index of one member).

    The average pairwise cosine of two clusters is the dot product of their vector sums over the product of their
    sizes, so a merge updates one row in O(n E); each row's best partner is cached, so finding the next merge is
    O(n) rather than O(n^2)."""
    n = len(vectors)
    labels = np.arange(n)
    if n < 2:
        return labels
    sums = np.asarray(vectors, np.float64).copy()
    sizes = np.ones(n)
    blocked = np.zeros((n, n), bool) if cannot is None else cannot.copy()
    np.fill_diagonal(blocked, True)
    sim = np.where(blocked, -np.inf, sums @ sums.T)
    best = sim.argmax(axis=1)
    best_sim = sim[np.arange(n), best]

    def refresh(rows):
        best[rows] = sim[rows].argmax(axis=1)
        best_sim[rows] = sim[rows, best[rows]]

    while True:
        i = int(np.argmax(best_sim))
        if not best_sim[i] >= threshold:
            break
        j = int(best[i])
        sums[i] += sums[j]
        sizes[i] += sizes[j]
        labels[labels == j] = i
        blocked[i] |= blocked[j]
        blocked[:, i] = blocked[i]
        blocked[j, :] = blocked[:, j] = True
        sim[i, :] = sim[:, i] = np.where(blocked[i], -np.inf, sums @ sums[i] / (sizes * sizes[i]))
        sim[j, :] = sim[:, j] = -np.inf
        best_sim[j] = -np.inf
        raised = sim[:, i] > best_sim
        best[raised], best_sim[raised] = i, sim[raised, i]
        stale = np.flatnonzero((best == i) | (best == j))
        refresh(np.union1d(stale, [i]))
        best_sim[j] = -np.inf
    return labels


def assign_identities(rows: list[FaceRow], threshold: float) -> list[FaceRow]:
    """The rows with `identity_id` set (1, 2, ... in order of first appearance). A track is its kept faces' mean
    embedding; two tracks of one video whose time spans overlap are two people."""
    groups: dict[tuple, list[FaceRow]] = defaultdict(list)
    for row in rows:
        groups[row.track_key].append(row)
    keys = list(groups)
    if not keys:
        return []
    means = np.stack([np.mean([r.embedding for r in groups[k]], axis=0) for k in keys])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    video = np.array([k[0] for k in keys], dtype=object)
    start = np.array([groups[k][0].track_start for k in keys])
    end = np.array([groups[k][0].track_end for k in keys])
    cannot = (video[:, None] == video[None, :]) & (start[:, None] <= end[None, :]) & (start[None, :] <= end[:, None])
    labels = cluster(means, threshold, cannot)
    ids: dict[int, int] = {}
    identity = {key: ids.setdefault(int(label), len(ids) + 1) for key, label in zip(keys, labels)}
    return [dataclasses.replace(row, identity_id=identity[row.track_key]) for row in rows]


def _z(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return (x - x.mean()) / std if std > 1e-12 else np.zeros_like(x)


def identity_scores(rows: list[FaceRow], fusion: str) -> np.ndarray:
    """The per-track fusion rule applied over one identity's rows (its z-scores are the identity's)."""
    if fusion == "learned":
        with_iqa = any(r.iqa_model for r in rows)
        return FusionModel.load(iqa=with_iqa).scores(np.stack([face_row_signals(r) for r in rows]))
    s = np.array([r.serfiq for r in rows], np.float64)
    # A face its track kept without an IQA call (the cascade's SER-FIQ fallback) counts as average quality.
    q = np.array([np.nan if r.iqa_model and not r.got_iqa else r.quality for r in rows], np.float64)
    q = np.nan_to_num(q, nan=float(np.nanmean(q)) if np.isfinite(q).any() else 0.0)
    if fusion == "zsum":
        return _z(s) + _z(q)
    if fusion == "zmin":
        return np.minimum(_z(s), _z(q))
    return q


def top_per_identity(rows: list[FaceRow], topk: int, fusion: str, min_gap: float, max_similarity: float,
                     pose_bins: bool) -> list[FaceRow]:
    """The top-k rows of each identity from its tracks' kept rows, under the same diversity rules as a track
    (`min_gap` between faces of one video). Rows keep their order; `rank` becomes the rank in the identity and
    `score` the identity-level score."""
    by_identity: dict[int, list[FaceRow]] = defaultdict(list)
    for row in rows:
        by_identity[row.identity_id].append(row)

    def fits(row: FaceRow, kept: list[FaceRow]) -> bool:
        return all((row.video != k.video or abs(row.pts_time - k.pts_time) >= min_gap) and
                   (max_similarity >= 1 or float(np.dot(row.embedding, k.embedding)) <= max_similarity)
                   for k in kept)

    chosen: dict[int, tuple[int, float]] = {}   # id(row) -> (rank, score)
    for members in by_identity.values():
        scores = identity_scores(members, fusion)
        ranked = [members[i] for i in np.argsort(-scores, kind="stable")]
        score_of = {id(r): float(s) for r, s in zip(members, scores)}
        picked = pick_diverse(ranked, topk, fits, (lambda r: r.pose) if pose_bins else None,
                              score=lambda r: score_of[id(r)])
        for rank, row in enumerate(picked, 1):
            chosen[id(row)] = (rank, score_of[id(row)])
    return [dataclasses.replace(row, rank=chosen[id(row)][0], score=chosen[id(row)][1]) for row in rows
            if id(row) in chosen]
