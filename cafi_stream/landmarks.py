"""Stage 4a: a detected face's 5 alignment points and face outline: from mediapipe's face mesh, or from the
detector's own 5 keypoints (an ellipse through forehead, cheeks and chin) where no mesh runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ._native import native_stderr_silenced
from .errors import InputError

# Mesh indices. "Right"/"left" are the subject's; in the image the subject's right eye is on the left, which is
# the order of the ArcFace template.
_RIGHT_EYE = [33, 160, 158, 133, 153, 144]
_LEFT_EYE = [362, 385, 387, 263, 373, 380]
_NOSE_TIP = 1
_MOUTH_RIGHT, _MOUTH_LEFT = 61, 291
_MESH_CROP = 1.3   # the mesh's own short-range detector needs some margin around the face box


@dataclass(frozen=True)
class FaceLandmarks:
    mesh: np.ndarray | None   # (468, 2) source pixels; None without the mesh
    five: np.ndarray          # (5, 2): right eye, left eye, nose tip, right mouth corner, left mouth corner
    oval: np.ndarray          # (K, 2) face outline polygon, in order

    def shifted(self, offset: np.ndarray) -> "FaceLandmarks":
        """The same points in a crop whose top left is `offset` in source pixels."""
        return FaceLandmarks(None if self.mesh is None else self.mesh - offset, self.five - offset, self.oval - offset)


def keypoint_landmarks(five: np.ndarray, points: int = 32) -> FaceLandmarks:
    """Landmarks from a detector's 5 points alone. The outline is an ellipse on the eye-to-mouth axis: from one
    eye-to-mouth distance above the eyes (forehead) to 0.8 of it below the mouth (chin), 1.15 inter-eye distances
    to each side, the proportions of a frontal face; it turns with the face's roll."""
    five = np.asarray(five, np.float32)
    eyes, mouth = (five[0] + five[1]) / 2, (five[3] + five[4]) / 2
    down = mouth - eyes
    length = float(np.hypot(*down)) or 1.0
    down = down / length
    across = np.array([down[1], -down[0]], np.float32)
    top, bottom = -1.0, 1.8   # forehead and chin, in eye-to-mouth distances from the eyes
    centre = eyes + down * length * (top + bottom) / 2
    half_height = length * (bottom - top) / 2
    half_width = max(1.15 * float(np.hypot(*(five[1] - five[0]))), 0.6 * half_height)
    t = np.linspace(0, 2 * np.pi, points, endpoint=False, dtype=np.float32)
    oval = centre + np.cos(t)[:, None] * across * half_width + np.sin(t)[:, None] * down * half_height
    return FaceLandmarks(mesh=None, five=five, oval=oval.astype(np.float32))


def _oval_order() -> list[int]:
    """Walk mediapipe's FACEMESH_FACE_OVAL edge set into one closed polygon."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_FACE_OVAL

    nxt = dict(FACEMESH_FACE_OVAL)
    start = min(nxt)
    order, node = [start], nxt[start]
    while node != start and len(order) <= len(nxt):
        order.append(node)
        node = nxt[node]
    return order


class FaceMesher:
    def __init__(self):
        with native_stderr_silenced():
            try:
                import mediapipe as mp
            except ImportError as e:
                raise InputError("the face mesh needs the mediapipe extra: pip install 'cafi-stream[mediapipe]'"
                                 ) from e
            self._model = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                          refine_landmarks=False)
            self._model.process(np.zeros((64, 64, 3), np.uint8))
        self._oval = _oval_order()

    @staticmethod
    def model_file() -> Path:
        import mediapipe

        return Path(mediapipe.__file__).parent / "modules" / "face_landmark" / "face_landmark.tflite"

    def __call__(self, image: np.ndarray, box: np.ndarray) -> FaceLandmarks | None:
        """Landmarks of the face in `box` (xyxy), or None when the mesh finds no face there."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        side = (box[2] - box[0]) * _MESH_CROP
        x0, y0 = cx - side / 2, cy - side / 2
        # Warp instead of slicing so that faces at the frame border keep their geometry (black outside).
        size = int(round(min(max(side, 96), 256)))
        scale = size / side
        m = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]], np.float32)
        crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        with native_stderr_silenced():   # the mesh warns on stderr at unpredictable frames
            result = self._model.process(crop)
        if not result.multi_face_landmarks:
            return None
        lm = result.multi_face_landmarks[0].landmark
        pts = np.array([(p.x * size, p.y * size) for p in lm], np.float32) / scale + np.array([x0, y0], np.float32)
        five = np.stack([pts[_RIGHT_EYE].mean(0), pts[_LEFT_EYE].mean(0), pts[_NOSE_TIP],
                         pts[_MOUTH_RIGHT], pts[_MOUTH_LEFT]]).astype(np.float32)
        return FaceLandmarks(mesh=pts, five=five, oval=pts[self._oval])

    def close(self) -> None:
        self._model.close()
