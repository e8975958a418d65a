"""Stage 4b: the crops a face is judged and saved by: ArcFace-aligned 112x112, background-masked IQA crop, context."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .landmarks import FaceLandmarks

# ArcFace / insightface 5-point template for a 112x112 face.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


@dataclass(frozen=True)
class FaceCrops:
    aligned: np.ndarray    # (S, S, 3) RGB, 5-point similarity alignment
    masked: np.ndarray     # (Q, Q, 3) RGB, the source box with everything outside the face oval set to black
    context: np.ndarray    # RGB crop of the source frame around the face, at source resolution
    mask_coverage: float   # fraction of the masked crop that is face


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """The least-squares similarity (rotation, uniform scale, translation; no reflection) taking `src` onto `dst`
    (Umeyama 1991), as a 2x3 matrix: the fit ArcFace-family models are trained with. None when `src` has no spread
    or is not finite."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        return None
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s ** 2).sum() / len(src)
    if var_s < 1e-9:
        return None
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    flip = np.diag([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rot = u @ flip @ vt
    scale = float((sig * np.diag(flip)).sum() / var_s)
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]]).astype(np.float32)


def similarity_to_template(five: np.ndarray, size: int = 112, box: np.ndarray | None = None) -> np.ndarray:
    """Least-squares fit of the 5 points to the ArcFace template. Points with no spread (a degenerate mesh) fall
    back to the face box (or, without one, to the template's centre at unit scale), never to an error."""
    dst = ARCFACE_TEMPLATE * (size / 112.0)
    m = umeyama(five, dst)
    if m is not None:
        return m
    if box is not None and np.isfinite(box).all() and box[2] > box[0]:
        return _square_warp_matrix(box, size)
    centre = np.nan_to_num(np.asarray(five, np.float64)).mean(0)
    return np.array([[1, 0, dst[:, 0].mean() - centre[0]], [0, 1, dst[:, 1].mean() - centre[1]]], np.float32)


def align_face(image: np.ndarray, five: np.ndarray, size: int = 112, box: np.ndarray | None = None) -> np.ndarray:
    return cv2.warpAffine(image, similarity_to_template(five, size, box), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT)


def _square_warp_matrix(box: np.ndarray, size: int) -> np.ndarray:
    scale = size / float(box[2] - box[0])
    return np.array([[scale, 0, -box[0] * scale], [0, scale, -box[1] * scale]], np.float32)


def _square_resize(image: np.ndarray, box: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The square `box` (zeros outside the image) resampled to size x size at its exact (sub-pixel) place and scale,
    as a warp would: bicubic up, area down, but through a resize of whole pixels, which costs ~15x less than a
    bicubic warp. Also the 2x3 matrix from image to crop pixels."""
    x0, y0, side = float(box[0]), float(box[1]), max(float(box[2] - box[0]), 1e-3)
    # A window of whole pixels with a 2 px margin is resized to a whole size (its scale off by under half an output
    # pixel across the crop); the crop then starts at the output pixel nearest to the box's corner.
    ax, ay = int(np.floor(x0)) - 2, int(np.floor(y0)) - 2
    n = int(np.ceil(side)) + 5
    out_n = max(size, int(round(n * size / side)))
    s = out_n / n
    cx = min(max(0, int(round((x0 - ax + 0.5) * s - 0.5))), out_n - size)
    cy = min(max(0, int(round((y0 - ay + 0.5) * s - 0.5))), out_n - size)
    # crop pixel (u, v) samples image point (ax + (u + cx + 0.5) / s - 0.5, ...)
    m = np.array([[s, 0, (0.5 - ax) * s - 0.5 - cx], [0, s, (0.5 - ay) * s - 0.5 - cy]], np.float32)
    h, w = image.shape[:2]
    bx0, by0, bx1, by1 = max(0, ax), max(0, ay), min(w, ax + n), min(h, ay + n)
    if bx1 <= bx0 or by1 <= by0:
        return np.zeros((size, size, 3), np.uint8), m
    part = image[by0:by1, bx0:bx1]
    if (bx0, by0, bx1, by1) != (ax, ay, ax + n, ay + n):
        part = cv2.copyMakeBorder(part, by0 - ay, ay + n - by1, bx0 - ax, ax + n - bx1, cv2.BORDER_CONSTANT, value=0)
    big = cv2.resize(part, (out_n, out_n), interpolation=cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA)
    return big[cy:cy + size, cx:cx + size], m


def context_crop(image: np.ndarray, box: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) * scale / 2
    x0, y0 = max(0, int(round(cx - half))), max(0, int(round(cy - half)))
    x1, y1 = min(w, int(round(cx + half))), min(h, int(round(cy + half)))
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def crop_face(image: np.ndarray, box: np.ndarray, landmarks: FaceLandmarks, aligned_size: int = 112,
              iqa_size: int = 384, context_scale: float = 1.6) -> FaceCrops:
    masked, m = _square_resize(image, box, iqa_size)
    oval = landmarks.oval @ m[:, :2].T + m[:, 2]
    mask = np.zeros((iqa_size, iqa_size), np.uint8)
    cv2.fillPoly(mask, [np.round(oval).astype(np.int32)], 1)
    masked = cv2.bitwise_and(masked, masked, mask=mask)   # zero outside: 10x faster than a broadcast multiply
    return FaceCrops(aligned=align_face(image, landmarks.five, aligned_size, box), masked=masked,
                     context=context_crop(image, box, context_scale),
                     mask_coverage=cv2.countNonZero(mask) / mask.size)


def align_largest_face(image: np.ndarray, faces, size: int = 112) -> np.ndarray | None:
    """The largest face of a photo, aligned; None when there is none. `faces` is a `FaceAnalysis`."""
    _, lm = faces.largest(image)
    return None if lm is None else align_face(image, lm.five, size)
