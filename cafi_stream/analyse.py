"""Stages 2-4a as one face-analysis front end: detect faces, then give each the 5 alignment points and the outline
that masks the background away.

Where the detector gives keypoints (SCRFD, YuNet), they align the face and an ellipse on them is the mask: no mesh
call. Where it does not (mediapipe), or where `detect.landmarks = "mesh"` asks for it, mediapipe's face mesh
supplies both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .config import DetectConfig
from .detect import Detections, create_detector
from .errors import InputError
from .landmarks import FaceLandmarks, FaceMesher, keypoint_landmarks


class FaceAnalysis:
    def __init__(self, cfg: DetectConfig, models_dir: Path, device: str = "cpu", backend: str = "auto"):
        self.detector, self.spec, path = create_detector(cfg, models_dir, device, backend)
        use_mesh = cfg.landmarks == "mesh" or (cfg.landmarks == "auto" and not self.spec.keypoints)
        if cfg.landmarks == "keypoints" and not self.spec.keypoints:
            raise InputError(f"detect.landmarks = keypoints: the {self.spec.name} detector gives no keypoints")
        self.mesher = FaceMesher() if use_mesh else None
        self.files: dict[str, tuple[str, Path]] = {}
        if path is not None:
            self.files["face_detector"] = (self.spec.name, path)
        if self.mesher is not None and self.mesher.model_file() is not None:
            self.files["face_mesh"] = ("mediapipe face_mesh", self.mesher.model_file())

    @classmethod
    def configured(cls, **detect) -> "FaceAnalysis":
        """The default configuration's face analysis on CPU, with `detect` overriding [detect] keys."""
        from .config import load_config
        from .models import default_models_dir

        return cls(load_config(overrides={"detect": detect}).detect, default_models_dir())

    @property
    def name(self) -> str:
        return self.spec.name + ("+mesh" if self.mesher is not None else "")

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        return self.detector.detect(images)

    def __call__(self, image: np.ndarray) -> Detections:
        return self.detector.detect([image])[0]

    def landmarks(self, image: np.ndarray, dets: Detections, i: int) -> FaceLandmarks | None:
        """The 5 points and outline of face `i`, or None when the mesh finds no face there."""
        if self.mesher is not None:
            return self.mesher(image, dets.xyxy[i])
        return keypoint_landmarks(dets.five[i])

    def largest(self, image: np.ndarray) -> tuple[Detections, FaceLandmarks | None]:
        """The largest face of a photo and its landmarks (an empty `Detections` when there is none)."""
        dets = self(image)
        if not len(dets):
            return dets, None
        i = int(np.argmax(dets.side))
        return dets[i], self.landmarks(image, dets, i)

    def close(self) -> None:
        self.detector.close()
        if self.mesher is not None:
            self.mesher.close()
