"""Stage 4a: dense face landmarks (mediapipe face mesh) for a detected face, and the 5 points used for alignment."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ._native import native_stderr_silenced

# Mesh indices. "Right"/"left" are the subject's; in the image the subject's right eye is on the left, which is
# the order of the ArcFace template.
_RIGHT_EYE = [33, 160, 158, 133, 153, 144]
_LEFT_EYE = [362, 385, 387, 263, 373, 380]
_NOSE_TIP = 1
_MOUTH_RIGHT, _MOUTH_LEFT = 61, 291
_MESH_CROP = 1.3   # the mesh's own short-range detector needs some margin around the face box


@dataclass(frozen=True)
class FaceLandmarks:
    mesh: np.ndarray   # (468, 2) source pixels
    five: np.ndarray   # (5, 2): right eye, left eye, nose tip, right mouth corner, left mouth corner
    oval: np.ndarray   # (K, 2) face outline polygon, in order


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
            import mediapipe as mp

            self._model = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                          refine_landmarks=False)
            self._model.process(np.zeros((64, 64, 3), np.uint8))
        self._oval = _oval_order()

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
