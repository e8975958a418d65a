"""The scoring cascade: cheap gates first, SER-FIQ on what passes, and the costly IQA model only where it can
change the answer, within a budget of calls per second of video."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from .fusion import TrackScores, signal_vector


def sharpness(aligned: np.ndarray) -> float:
    """Variance of the Laplacian of the aligned face: on one fixed scale, so comparable across faces."""
    return float(cv2.Laplacian(cv2.cvtColor(aligned, cv2.COLOR_RGB2GRAY), cv2.CV_32F).var())


def yaw_ratio(five: np.ndarray) -> float:
    """Nose offset from the eyes' midpoint along the eye line, in eye distances: 0 for a frontal face, growing
    with yaw; roll does not change it."""
    eye = five[1] - five[0]
    dist = float(np.hypot(*eye))
    if dist <= 0:
        return math.inf
    return float(np.dot(five[2] - (five[0] + five[1]) / 2, eye / dist) / dist)


# A frontal face's eyes are about a third of its square box apart; seen from the side, the detector's keypoints
# collapse together and the nose offset along so short an eye line says nothing about yaw.
MIN_EYE_SPAN = 0.15


def in_profile(five: np.ndarray, side: float) -> bool:
    """Whether the eyes are under MIN_EYE_SPAN of the face's box side apart: a face seen from the side."""
    return float(np.hypot(*(five[1] - five[0]))) < MIN_EYE_SPAN * side


class SampleGate:
    """Per track, of the faces sampled within one `window` (seconds of video) only the best goes on to SER-FIQ:
    the recognition network, the costliest step per face, is spent on the face that a cheap ranking picks, not on
    each near-duplicate. The ranking is the learned fusion on the capture measures alone (`scores`, a
    fusion.TrackScores that leaves SER-FIQ and IQA out), or without one the faces' `proxy` (detail). `window` 0:
    every face goes on."""

    def __init__(self, window: float, scores: TrackScores | None):
        self.window = window
        self.scores = scores
        self._held: dict[int, tuple[int, object]] = {}   # track -> (window, face)
        self.skipped = 0

    def submit(self, track_id: int, pts: float, face) -> list:
        """The faces to score now: the held one of this track's previous window, when `face` opens a new one."""
        if self.window <= 0:
            return [face]
        if self.scores is not None:
            self.scores.observe(track_id, _measured(face))
        w = int(pts // self.window)
        held = self._held.get(track_id)
        if held is not None and held[0] == w:
            self.skipped += 1
            if self._better(track_id, face, held[1]):
                self._held[track_id] = (w, face)
            return []
        self._held[track_id] = (w, face)
        return [held[1]] if held is not None else []

    def _better(self, track_id: int, a, b) -> bool:
        if self.scores is None:
            return a.proxy > b.proxy
        return self.scores.score(track_id, _measured(a)) > self.scores.score(track_id, _measured(b))

    def release(self, track_id: int) -> list:
        """An ending track's held face."""
        if self.scores is not None:
            self.scores.forget(track_id)
        held = self._held.pop(track_id, None)
        return [held[1]] if held is not None else []


def _measured(face) -> np.ndarray:
    """A face's signals before SER-FIQ: its capture measures."""
    return signal_vector(math.nan, None, face.measures)


@dataclass(order=True)
class _Queued:
    priority: float
    seq: int
    item: object = field(compare=False)


class IqaScheduler:
    """Chooses which SER-FIQ-passing faces get an IQA call.

    - Within one `window` (seconds) of a track only the face with the best proxy (select.Selector.proxy) is a
      candidate: the others are near-duplicates in time, and at most one face per `min_gap` window can be kept.
    - Candidates wait in a priority queue; a token bucket refilled at `budget` calls per second of video (up to
      `burst`) decides how many are scored. Stale candidates (older than `max_age` seconds) are dropped.
    - `could_enter(item)` lets the caller veto candidates that cannot enter their track's top-k.
    - `exhaustive` scores every candidate at once: the reference the cascade is measured against.
    """

    def __init__(self, budget: float, burst: float, window: float, max_age: float, exhaustive: bool = False,
                 could_enter: Callable[[object], bool] = lambda item: True):
        self.budget = budget
        self.burst = burst
        self.window = window
        self.max_age = max_age
        self.exhaustive = exhaustive
        self.could_enter = could_enter
        self.tokens = burst
        self._clock: float | None = None
        self._current: dict[int, tuple[int, float, float, object]] = {}   # track -> (window, proxy, pts, item)
        self._queue: list[_Queued] = []
        self._seq = 0
        self.skipped = 0

    def _enqueue(self, proxy: float, pts: float, item) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Queued(-proxy, self._seq, (pts, item)))

    def submit(self, track_id: int, pts: float, proxy: float, item) -> None:
        if self.exhaustive:
            self._enqueue(proxy, pts, item)
            return
        w = int(pts // self.window) if self.window > 0 else self._seq
        cur = self._current.get(track_id)
        if cur is not None and cur[0] == w:
            if proxy > cur[1]:
                self._current[track_id] = (w, proxy, pts, item)
            self.skipped += 1
            return
        if cur is not None:
            self._enqueue(cur[1], cur[2], cur[3])
        self._current[track_id] = (w, proxy, pts, item)

    def _refill(self, now: float) -> None:
        if self._clock is not None and now > self._clock:
            self.tokens = min(self.burst, self.tokens + self.budget * (now - self._clock))
        self._clock = now if self._clock is None else max(self._clock, now)

    def due(self, now: float, track_id: int | None = None) -> list:
        """Candidates to score now. With `track_id`, that track is ending: its last window is queued first."""
        if self.exhaustive:
            out = [q.item[1] for q in sorted(self._queue, key=lambda q: q.seq)]
            self._queue.clear()
            return out
        if track_id is not None and track_id in self._current:
            _, proxy, pts, item = self._current.pop(track_id)
            self._enqueue(proxy, pts, item)
        self._refill(now)
        out, keep = [], []
        while self._queue and self.tokens >= 1:
            q = heapq.heappop(self._queue)
            pts, item = q.item
            if now - pts > self.max_age or not self.could_enter(item):
                self.skipped += 1
                continue
            self.tokens -= 1
            out.append(item)
        # Whatever is left for an ending track can never be scored later.
        if track_id is not None:
            for q in self._queue:
                if getattr(q.item[1], "track_id", None) == track_id:
                    self.skipped += 1
                else:
                    keep.append(q)
            self._queue = keep
            heapq.heapify(self._queue)
        return out
