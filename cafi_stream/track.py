"""Stage 3: group faces across frames. norfair (Kalman filter + IoU matching) follows faces through short
occlusions; a colour-histogram shot-cut detector ends every track at a cut, since no tracker handles cuts itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from .config import TrackConfig
from .detect import Detections


@dataclass
class TrackUpdate:
    track_ids: np.ndarray                            # (N,) track id per detection, -1 when unmatched
    ended: list[int] = field(default_factory=list)   # tracks that ended at this update


class ShotCutDetector:
    """A hard cut changes nearly the whole picture at once, in structure and in colour. Light, colour and quality
    changes of the whole frame leave its coarse structure alone; motion, or a face that changes, changes only part
    of it, and not the frame's colours. So a cut needs both:

    - structure: each frame becomes its 64x36 luma, smoothed and normalised to zero mean and unit spread (which
      cancels global brightness and contrast: auto-exposure, low light; colour is left out: white balance; the
      coarse smoothed scale averages away noise, blur and compression); more than `threshold` of a 4x8 grid of
      blocks must have moved by more than BLOCK_CHANGE on average;
    - colour: the hue-saturation histograms of the two frames must differ (HistogramCutDetector at HIST_CHANGE,
      the earlier rule alone, which every cut of the fit clips passes).

    BLOCK_CHANGE and the default threshold were chosen on the `fit` clips of scripts/eval_cuts.py alone (at 3, 5
    and 8 seconds a clip): BLOCK_CHANGE 0.4 of 0.3/0.4/0.5/0.6 for the widest gap between changes and cuts, and
    the threshold 0.39 in the middle of that gap (changes up to 0.31, cuts from 0.47)."""

    BLOCK_CHANGE = 0.4
    HIST_CHANGE = 0.3

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._prev = None
        self._colour = HistogramCutDetector(self.HIST_CHANGE)

    def changed(self, image: np.ndarray) -> float | None:
        """The share of blocks whose structure changed since the previous frame (None for the first frame)."""
        small = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (64, 36), interpolation=cv2.INTER_AREA)
        z = cv2.GaussianBlur(small.astype(np.float32), (0, 0), 1.5)
        z -= z.mean()
        z /= max(float(np.sqrt((z * z).mean())), 2.0)   # a flat frame (a fade to black) stays near 0
        prev, self._prev = self._prev, z
        if prev is None:
            return None
        blocks = np.abs(z - prev).reshape(4, 9, 8, 8).mean(axis=(1, 3))
        return float((blocks > self.BLOCK_CHANGE).mean())

    def __call__(self, image: np.ndarray) -> bool:
        share = self.changed(image)
        colour = self._colour(image)   # every frame, to keep its previous histogram current
        return share is not None and share > self.threshold and colour


class HistogramCutDetector:
    """Bhattacharyya distance between hue-saturation histograms of consecutive frames: the earlier rule on its own
    (scripts/eval_cuts.py compares it), which global light, colour and quality changes trip."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._prev = None

    def __call__(self, image: np.ndarray) -> bool:
        small = cv2.resize(image, (64, 36), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
        cv2.normalize(hist, hist, 1.0, 0.0, cv2.NORM_L1)
        cut = self._prev is not None and cv2.compareHist(self._prev, hist, cv2.HISTCMP_BHATTACHARYYA) > self.threshold
        self._prev = hist
        return cut


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two xyxy boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, float(w)) * max(0.0, float(h))
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


class FaceTracker:
    def __init__(self, cfg: TrackConfig, fps: float, period: int = 1):
        self.cfg = cfg
        self.period = period   # frames between two updates (the detection stride)
        # norfair counts updates; our gap is in seconds.
        self.hit_counter_max = max(1, math.ceil(cfg.max_gap * fps / period))
        self.cuts = ShotCutDetector(cfg.shot_cut) if cfg.shot_cut > 0 else None
        self._tracker = None
        self._ids: dict[int, int] = {}     # norfair id (per tracker instance) -> our id
        self._next_id = 1
        self.frames_seen: dict[int, int] = {}   # detections per live track
        self.last_seen: dict[int, float] = {}   # last detection time per open track
        self.last_box: dict[int, np.ndarray] = {}   # last detected box per open track
        self.shot_cuts = 0
        from norfair import Detection   # noqa: F401  (norfair's first import costs ~0.7 s: pay it at start-up)

    def _new_tracker(self):
        from norfair import Tracker

        return Tracker(distance_function="iou", distance_threshold=1.0 - self.cfg.iou_threshold,
                       hit_counter_max=self.hit_counter_max, initialization_delay=0)

    def _live(self) -> set[int]:
        return set(self.last_seen)

    def check_cut(self, image: np.ndarray) -> bool:
        """Whether `image` starts a new shot; the caller then ends every track with `finish`."""
        cut = self.cuts is not None and self.cuts(image)
        self.shot_cuts += cut
        return cut

    def update(self, detections: Detections, pts: float) -> TrackUpdate:
        """Match `detections` (at time `pts`) to tracks. A track ends when it has gone `max_gap` seconds without a
        detection (also when frames were dropped and norfair, which counts updates, would keep it longer). Norfair
        drops a young track after a few missed updates; a new one that starts on its last box within `max_gap`
        takes its id, so a face whose detection flickers stays one track."""
        from norfair import Detection

        if self._tracker is None:
            self._tracker, self._ids = self._new_tracker(), {}
        dets = [Detection(points=detections.xyxy[i].reshape(2, 2).astype(np.float64),
                          scores=np.repeat(float(detections.confidence[i]), 2), data=i)
                for i in range(len(detections))]
        self._tracker.update(detections=dets, period=self.period)
        alive = {o.id for o in self._tracker.tracked_objects}
        self._ids = {k: v for k, v in self._ids.items() if k in alive}   # bounded on endless streams
        ids = np.full(len(detections), -1, np.int64)
        for obj in self._tracker.tracked_objects:
            if obj.id is None:
                continue
            det = obj.last_detection
            if det is None or not any(det is d for d in dets):
                continue
            box = detections.xyxy[det.data]
            if obj.id not in self._ids:
                self._ids[obj.id] = self._relink(box, pts)
            tid = self._ids[obj.id]
            ids[det.data] = tid
            self.frames_seen[tid] = self.frames_seen.get(tid, 0) + 1
            self.last_seen[tid] = pts
            self.last_box[tid] = box
        ended = sorted(tid for tid, t in self.last_seen.items() if pts - t > self.cfg.max_gap)
        for tid in ended:
            del self.last_seen[tid]
            self.last_box.pop(tid, None)
        if ended:   # ended by time: if norfair matches it again, it is a new track
            self._ids = {k: v for k, v in self._ids.items() if v not in ended}
        return TrackUpdate(track_ids=ids, ended=ended)

    def _relink(self, box: np.ndarray, pts: float) -> int:
        """The id for a track norfair just started: an open track that norfair lost, last seen on this box."""
        held = set(self._ids.values())
        best, best_iou = None, self.cfg.iou_threshold
        for tid, last in self.last_box.items():
            if tid not in held and pts - self.last_seen[tid] <= self.cfg.max_gap:
                o = iou(last, box)
                if o >= best_iou:
                    best, best_iou = tid, o
        if best is None:
            best = self._next_id
            self._next_id += 1
        return best

    def finish(self) -> list[int]:
        """End every live track (end of input, or a shot cut)."""
        live = sorted(self._live())
        self._tracker = None
        self.last_seen.clear()
        self.last_box.clear()
        return live

    @property
    def tracks_started(self) -> int:
        return self._next_id - 1

    def is_real(self, track_id: int) -> bool:
        """Whether a track was detected often enough to be a face, not a one-off false detection."""
        return self.frames_seen.pop(track_id, 0) >= self.cfg.min_frames
