"""Stage 3: group faces across frames. ByteTrack (supervision's: Kalman filter, IoU matching in two stages by
detection score) follows faces through short occlusions and flickering detections; a shot-cut detector ends every
track at a cut, since no tracker handles cuts itself.

supervision's ByteTrack runs on numpy 1 and 2. Its successor, Roboflow's `trackers`, needs numpy 2, which the
mediapipe extra's numpy 1 world cannot install; norfair pins numpy < 2."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np

from .config import TrackConfig
from .decode import VideoFrame
from .detect import Detections


@dataclass
class TrackUpdate:
    track_ids: np.ndarray                            # (N,) track id per detection, -1 when unmatched
    ended: list[int] = field(default_factory=list)   # tracks that ended at this update


class ShotCutDetector:
    """A hard cut changes nearly the whole picture at once, in structure and in colour. Light, colour and quality
    changes of the whole frame leave its coarse structure alone; motion, or something that comes into view (a
    hand over the lens, a passer-by), changes only part of it. So a cut needs both:

    - structure: each frame becomes its 64x36 luma, smoothed (which averages away noise, blur and compression),
      cut into a 4x8 grid of blocks, and each block normalised to zero mean and unit spread on its own (which
      cancels brightness and contrast, block by block: auto-exposure, low light; colour is left out: white
      balance); more than `threshold` of the blocks must have moved by more than BLOCK_CHANGE on average. Each
      block on its own, so that a bright object that covers part of the frame changes those blocks only, not the
      normalisation of the whole frame;
    - colour: the hue-saturation histograms of the two frames must differ (HistogramCutDetector at HIST_CHANGE,
      the earlier rule alone).

    BLOCK_CHANGE, FLAT and the default threshold were chosen on fit data alone: scripts/eval_cuts.py's `fit`
    clips at 3, 5 and 8 seconds a clip, ten draws of scripts/eval_real.py's fit video (whose occluders come and
    go from one frame to the next) and a card video of fit photos. Of BLOCK_CHANGE 0.4-0.7 and FLAT 1-4, these
    leave the widest gap between the frames whose colour changed without a cut (up to 0.47) and the cuts (from
    0.78); the threshold, 0.625, is its middle. README, "Shot cuts"."""

    BLOCK_CHANGE = 0.4
    FLAT = 1.0          # least spread (grey levels) a block is normalised by: a flat block stays near 0
    HIST_CHANGE = 0.3

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._prev = None
        self._colour = HistogramCutDetector(self.HIST_CHANGE)

    def changed(self, thumb: np.ndarray) -> float | None:
        """The share of blocks whose structure changed since the previous frame (None for the first frame).
        `thumb` is the frame at 64x36 RGB (`VideoFrame.thumbnail`)."""
        small = cv2.GaussianBlur(cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.5)
        blocks = small.reshape(4, 9, 8, 8).transpose(0, 2, 1, 3).reshape(4, 8, 72)
        blocks = blocks - blocks.mean(axis=2, keepdims=True)
        blocks /= np.maximum(np.sqrt((blocks * blocks).mean(axis=2, keepdims=True)), self.FLAT)
        prev, self._prev = self._prev, blocks
        if prev is None:
            return None
        return float((np.abs(blocks - prev).mean(axis=2) > self.BLOCK_CHANGE).mean())

    def __call__(self, thumb: np.ndarray) -> bool:
        share = self.changed(thumb)
        colour = self._colour(thumb)   # every frame, to keep its previous histogram current
        return share is not None and share > self.threshold and colour


class HistogramCutDetector:
    """Bhattacharyya distance between hue-saturation histograms of consecutive frames: the earlier rule on its own
    (scripts/eval_cuts.py compares it), which global light, colour and quality changes trip."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._prev = None

    def __call__(self, thumb: np.ndarray) -> bool:
        hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
        cv2.normalize(hist, hist, 1.0, 0.0, cv2.NORM_L1)
        cut = self._prev is not None and cv2.compareHist(self._prev, hist, cv2.HISTCMP_BHATTACHARYYA) > self.threshold
        self._prev = hist
        return cut


class FaceTracker:
    def __init__(self, cfg: TrackConfig, fps: float):
        self.cfg = cfg
        # ByteTrack counts updates (full-frame detections, which need not be evenly spaced); our gap is in seconds:
        # ByteTrack keeps a lost track for max_gap at the highest rate (every frame), and `update` ends it by time.
        self.lost_updates = max(1, math.ceil(cfg.max_gap * fps))
        self.cuts = ShotCutDetector(cfg.shot_cut) if cfg.shot_cut > 0 else None
        self._ids: dict[int, int] = {}     # ByteTrack id (per tracker instance) -> our id
        self._next_id = 1
        self.frames_seen: dict[int, int] = {}   # detections per live track
        self.last_seen: dict[int, float] = {}   # last detection time per open track
        # Tracks matched at the latest full-frame update -> their latest box: the faces that can be found again
        # between full-frame detections (a track ByteTrack lost waits for the next one, so it never lives on twice).
        self._boxes: dict[int, np.ndarray] = {}
        self.shot_cuts = 0
        self._tracker = self._new_tracker()   # made now: supervision's first import costs ~0.5 s

    def _new_tracker(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # deprecated for `trackers`: see the module docstring
            import supervision as sv

            # Every detection passed the detector's threshold: all take ByteTrack's first, high-score stage.
            return sv.ByteTrack(track_activation_threshold=0.0, lost_track_buffer=self.lost_updates,
                                minimum_matching_threshold=1.0 - self.cfg.iou_threshold, frame_rate=30,
                                minimum_consecutive_frames=1)

    def check_cut(self, frame: VideoFrame) -> bool:
        """Whether `frame` starts a new shot; the caller then ends every track with `finish`."""
        cut = self.cuts is not None and self.cuts(frame.thumbnail)
        self.shot_cuts += cut
        return cut

    def update(self, detections: Detections, pts: float) -> TrackUpdate:
        """Match `detections` (at time `pts`) to tracks. A track ends when it has gone `max_gap` seconds without a
        detection (also when frames were dropped and ByteTrack, which counts updates, would keep it longer). A
        face's first detection has no track yet (-1): ByteTrack confirms a track on its second."""
        import supervision as sv

        if self._tracker is None:
            self._tracker, self._ids = self._new_tracker(), {}
        found = self._tracker.update_with_detections(sv.Detections(
            xyxy=detections.xyxy.astype(np.float32), confidence=detections.confidence.astype(np.float32),
            data={"index": np.arange(len(detections))}))
        ids = np.full(len(detections), -1, np.int64)
        for index, external in zip(found.data.get("index", []), found.tracker_id.tolist()):
            if external not in self._ids:
                self._ids[external] = self._next_id
                self._next_id += 1
            tid = self._ids[external]
            ids[index] = tid
            self.seen(tid, detections.xyxy[index], pts)
        matched = set(ids.tolist())
        self._boxes = {tid: box for tid, box in self._boxes.items() if tid in matched}
        ended = sorted(tid for tid, t in self.last_seen.items() if pts - t > self.cfg.max_gap)
        for tid in ended:
            del self.last_seen[tid]
        if ended:   # ended by time: if ByteTrack matches it again, it is a new track
            self._ids = {k: v for k, v in self._ids.items() if v not in ended}
        return TrackUpdate(track_ids=ids, ended=ended)

    def seen(self, track_id: int, box: np.ndarray, pts: float) -> None:
        """Track `track_id` was detected at `box` at time `pts` (by a full-frame update, or found again around its
        box between them)."""
        self.frames_seen[track_id] = self.frames_seen.get(track_id, 0) + 1
        self.last_seen[track_id] = pts
        self._boxes[track_id] = box

    def lost(self, track_id: int) -> None:
        """Track `track_id` was not found again around its box: it waits for the next full-frame update."""
        self._boxes.pop(track_id, None)

    @property
    def boxes(self) -> dict[int, np.ndarray]:
        """The latest box of each track matched at the latest full-frame update and not lost since. (Moving it on
        at the speed of its latest two detections found fast walkers more often but lost more faces on the
        evaluation's talking heads, whose boxes jitter.)"""
        return dict(self._boxes)

    def finish(self) -> list[int]:
        """End every live track (end of input, or a shot cut)."""
        live = sorted(self.last_seen)
        self._tracker = None
        self.last_seen.clear()
        self._boxes.clear()
        return live

    @property
    def tracks_started(self) -> int:
        return self._next_id - 1

    def is_real(self, track_id: int) -> bool:
        """Whether a track was detected often enough to be a face, not a one-off false detection."""
        return self.frames_seen.pop(track_id, 0) >= self.cfg.min_frames
