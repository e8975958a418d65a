"""Stage 2: face detection with mediapipe's full-range detector (the short-range one misses ~100 px faces in 720p)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._native import native_stderr_silenced
from .config import DetectConfig


@dataclass
class Detections:
    """Faces found in one frame. `xyxy` is each face's square source box, in source pixels."""

    xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((0, 6, 2), np.float32))  # mediapipe's 6 points

    def __len__(self) -> int:
        return len(self.confidence)

    @property
    def side(self) -> np.ndarray:
        return self.xyxy[:, 2] - self.xyxy[:, 0]


def detection_stride(fps: float, rate: float) -> int:
    """Detect on every n-th frame so that detections come at about `rate` per second (0: every frame)."""
    return 1 if rate <= 0 or fps <= rate else max(1, round(fps / rate))


class FaceDetector:
    def __init__(self, cfg: DetectConfig):
        self.box_scale = cfg.box_scale
        with native_stderr_silenced():
            import mediapipe as mp

            self._model = mp.solutions.face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=cfg.min_confidence)
            self._model.process(np.zeros((64, 64, 3), np.uint8))   # graph start-up logs go to /dev/null too

    def __call__(self, image: np.ndarray) -> Detections:
        h, w = image.shape[:2]
        result = self._model.process(image)
        if not result.detections:
            return Detections()
        boxes, scores, points = [], [], []
        for d in result.detections:
            rel = d.location_data.relative_bounding_box
            cx, cy = (rel.xmin + rel.width / 2) * w, (rel.ymin + rel.height / 2) * h
            half = max(rel.width * w, rel.height * h) * self.box_scale / 2
            boxes.append((cx - half, cy - half, cx + half, cy + half))
            scores.append(d.score[0])
            points.append([(k.x * w, k.y * h) for k in d.location_data.relative_keypoints])
        return Detections(np.asarray(boxes, np.float32), np.asarray(scores, np.float32),
                          np.asarray(points, np.float32))

    def close(self) -> None:
        self._model.close()
