"""Stage 4c: capture-quality measures of a face, after the families of ISO/IEC 29794-5 (whose reference
implementation is BSI's OFIQ). Each is cheap (well under 1 ms per face on one CPU core): they are computed for
every scored face, written to `--scores-out` and to every kept face's row, and can be used as gates or signals.

Photometric measures read the luma of the aligned 112x112 face (ArcFace geometry, so every face is measured on
the same region); blockiness and fine detail read the source pixels, where a codec's 8x8 grid is and where mild
defocus still shows (resampled to 112 pixels, a large face loses the finest scale that tells it); pose and eye/mouth
opening read the landmarks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .cascade import sharpness, yaw_ratio

# The inner face of the 112x112 aligned crop (brows to chin, cheek to cheek): background and hair stay out.
_INNER = (slice(28, 104), slice(22, 90))
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
# Mesh indices (mediapipe face mesh): eye contours as p1..p6 (corner, top, top, corner, bottom, bottom), mouth.
_RIGHT_EYE = (33, 160, 158, 133, 153, 144)
_LEFT_EYE = (362, 385, 387, 263, 373, 380)
_MOUTH = (61, 291, 13, 14)   # corners, inner upper lip, inner lower lip
_FRONTAL_PITCH = 0.494       # nose height between the eye and mouth lines on the ArcFace template


@dataclass(frozen=True)
class CaptureMeasures:
    luminance_mean: float       # mean luma of the inner face, 0..1
    luminance_std: float        # its spread (low: flat or washed-out light)
    under_exposure: float       # share of inner-face pixels at luma <= 25/255
    over_exposure: float        # share at luma >= 240/255
    dynamic_range: float        # 1st..99th percentile of luma, 0..1
    illumination_uniformity: float   # darker half / brighter half of the face (1: evenly lit)
    sharpness: float            # variance of the Laplacian of the aligned face
    detail: float               # the same at a coarser scale (sigma 1 px): blur lowers it, noise hardly raises it
    feature_detail: float       # `detail` of the eyes and the mouth, the least of the three (an occluder flattens it)
    fine_detail: float          # Laplacian variance of the central face in source pixels, less the noise's share
    noise: float                # Immerkær's noise sigma of the inner face, in 8-bit levels
    blockiness: float           # luma steps across the 8x8 grid / steps inside blocks (1: none)
    yaw: float                  # nose offset along the eye line, in eye distances (0: frontal)
    eye_span: float             # eye distance / eye-to-mouth height (a turn, or a face seen aslant, shortens it)
    pitch: float                # nose height between eye and mouth lines, minus the frontal value
    roll: float                 # angle of the eye line, degrees
    eyes_open: float | None     # mean eye aspect ratio (about 0.25-0.35 open, under 0.15 closed); None: no mesh
    mouth_open: float | None    # inner-lip gap / mouth width; None: no mesh

    def as_dict(self, digits: int = 4) -> dict:
        return {k: (None if v is None else round(float(v), digits)) for k, v in asdict(self).items()}


def luma(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def exposure(inner: np.ndarray) -> tuple[float, float, float, float, float]:
    """(mean, std, under-exposed share, over-exposed share, 1-99 percentile range) of 8-bit luma, on 0..1."""
    hist = np.bincount(inner.ravel(), minlength=256).astype(np.float64)
    n = hist.sum()
    levels = np.arange(256)
    mean = float((hist * levels).sum() / n)
    std = float(math.sqrt(max(0.0, (hist * (levels - mean) ** 2).sum() / n)))
    cdf = np.cumsum(hist) / n
    lo, hi = int(np.searchsorted(cdf, 0.01)), int(np.searchsorted(cdf, 0.99))
    return mean / 255, std / 255, float(cdf[25]), float(1 - cdf[239]), (hi - lo) / 255


def uniformity(inner: np.ndarray) -> float:
    """Mean luma of the darker face half over the brighter one (side light makes it small)."""
    half = inner.shape[1] // 2
    left, right = float(inner[:, :half].mean()), float(inner[:, half:].mean())
    return min(left, right) / max(left, right, 1e-6)


def smoothed(gray: np.ndarray) -> np.ndarray:
    """The aligned face's luma under a Gaussian of sigma 1 px (at 112 px a face): the scale `detail` reads."""
    return cv2.GaussianBlur(gray.astype(np.float32), (0, 0), gray.shape[0] / 112.0)


def detail(smooth: np.ndarray) -> float:
    """Variance of the Laplacian of the `smoothed` face: detail at a scale coarser than pixel noise, so blur and
    low resolution lower it while sensor noise, which inflates plain sharpness many times, raises it little."""
    return float(cv2.Laplacian(smooth, cv2.CV_32F).var())


# Eye and mouth regions of the 112x112 ArcFace crop (rows, columns), around the template's landmarks.
_FEATURES = ((slice(42, 62), slice(26, 52)), (slice(42, 62), slice(60, 86)), (slice(82, 103), slice(36, 77)))


def feature_detail(smooth: np.ndarray) -> float:
    """`detail` of the left eye, the right eye and the mouth regions of the `smoothed` face, the least of the
    three: a hand, a mask or hair over any of them leaves a flat patch where a face always has detail."""
    return min(detail(_region(smooth, rows, cols)) for rows, cols in _FEATURES)


def _region(img: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """`img[rows, cols]` with the slices given for a 112x112 crop, scaled to `img`'s size."""
    s = img.shape[0] / 112.0
    return img[int(rows.start * s):int(rows.stop * s), int(cols.start * s):int(cols.stop * s)]


def noise_sigma(inner: np.ndarray) -> float:
    """Immerkær (1996) fast noise estimate: the response to a Laplacian-difference kernel that cancels smooth
    structure, as a Gaussian sigma in 8-bit levels, over the flatter half of the face only (Tai and Yang's edge
    suppression), so that skin texture, beards and hair read as detail, not as noise."""
    img = inner.astype(np.float32)
    response = np.abs(cv2.filter2D(img, -1, _NOISE_KERNEL))[1:-1, 1:-1]
    grad = (np.abs(cv2.Sobel(img, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(img, cv2.CV_32F, 0, 1)))[1:-1, 1:-1]
    flat = grad <= np.median(grad)
    return float(response[flat].mean() * math.sqrt(math.pi / 2) / 6)


def _grid_ratio(steps: np.ndarray) -> float:
    """Mean step at the strongest of the 8 grid phases over the mean step at the other 7 (`steps`: absolute
    differences between neighbouring columns; the phase of column j is j % 8)."""
    columns = steps.mean(axis=0)
    per_phase = columns[:len(columns) // 8 * 8].reshape(-1, 8).mean(axis=0)
    k = int(np.argmax(per_phase))
    return float((per_phase[k] + 1.0) / (np.delete(per_phase, k).mean() + 1.0))


def source_patch(frame: np.ndarray, box: np.ndarray, share: float = 1.0, max_side: int = 128) -> np.ndarray | None:
    """The luma of the central part of the face box in source pixels, `share` of the box's side and at most
    `max_side` pixels a side (None when under 24 pixels)."""
    h, w = frame.shape[:2]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = min(share * (box[2] - box[0]) / 2, max_side / 2)
    x0, y0 = max(0, int(cx - half)), max(0, int(cy - half))
    x1, y1 = min(w, int(cx + half)), min(h, int(cy + half))
    if x1 - x0 < 24 or y1 - y0 < 24:
        return None
    return luma(np.ascontiguousarray(frame[y0:y1, x0:x1]))


def blockiness(patch: np.ndarray | None) -> float:
    """Blocking of a block codec in a `source_patch` of the face (source pixels, so that the grid holds): the mean
    absolute luma step across an 8x8 grid over the step inside its blocks, mean of the horizontal and vertical
    ratios (1: none). The grid's phase is found, not assumed: a stream cropped or a picture pasted after its
    encoding has its blocks off the frame's grid."""
    if patch is None:
        return 1.0
    y = patch.astype(np.float32)
    return (_grid_ratio(np.abs(np.diff(y, axis=1))) + _grid_ratio(np.abs(np.diff(y, axis=0)).T)) / 2


def fine_detail(patch: np.ndarray | None) -> float:
    """Detail at the finest scale the camera gives: the variance of the 4-neighbour Laplacian of a `source_patch`
    of the central face (eyes, nose, mouth), less the share that white noise of the measured `noise_sigma` adds to
    it (the kernel's squared weights sum to 20). Mild defocus, which resampling to 112 pixels hides on a large face,
    lowers it; sensor noise is taken out of it rather than read as detail. 0 without a patch."""
    if patch is None:
        return 0.0
    lap = float(cv2.Laplacian(patch.astype(np.float32), cv2.CV_32F).var())
    return max(0.0, lap - 20.0 * noise_sigma(patch) ** 2)


def head_pose(five: np.ndarray) -> tuple[float, float, float, float]:
    """(yaw, pitch, roll, eye span) from the five points: yaw and pitch as ratios (0: frontal), roll in degrees,
    eye span the eye distance over the eye-to-mouth height (foreshortened by a turn even where the nose stays
    between the eyes; person-dependent, so compared within a track)."""
    eye_r, eye_l, nose, mouth_r, mouth_l = np.asarray(five, np.float64)
    axis = eye_l - eye_r
    dist = float(np.hypot(*axis))
    if dist <= 0:
        return math.inf, math.inf, 0.0, 0.0
    ux = axis / dist
    uy = np.array([-ux[1], ux[0]])   # down the face, in image coordinates
    eye_mid, mouth_mid = (eye_r + eye_l) / 2, (mouth_r + mouth_l) / 2
    yaw = yaw_ratio(five)
    height = float(np.dot(mouth_mid - eye_mid, uy))
    pitch = float(np.dot(nose - eye_mid, uy) / height - _FRONTAL_PITCH) if height > 0 else math.inf
    roll = math.degrees(math.atan2(axis[1], axis[0]))
    return yaw, pitch, roll, (dist / height if height > 0 else 0.0)


def eye_aspect_ratio(mesh: np.ndarray, idx: tuple[int, ...]) -> float:
    p = mesh[list(idx)]
    width = float(np.linalg.norm(p[0] - p[3]))
    return (float(np.linalg.norm(p[1] - p[5]) + np.linalg.norm(p[2] - p[4])) / (2 * width)) if width > 0 else 0.0


def openness(mesh: np.ndarray | None) -> tuple[float | None, float | None]:
    """(mean eye aspect ratio, mouth opening) from the face mesh, or (None, None) without one."""
    if mesh is None or len(mesh) <= max(_LEFT_EYE):
        return None, None
    eyes = (eye_aspect_ratio(mesh, _RIGHT_EYE) + eye_aspect_ratio(mesh, _LEFT_EYE)) / 2
    corner_r, corner_l, upper, lower = (mesh[i] for i in _MOUTH)
    width = float(np.linalg.norm(corner_l - corner_r))
    return eyes, (float(np.linalg.norm(lower - upper)) / width if width > 0 else 0.0)


def measure(frame: np.ndarray, box: np.ndarray, aligned: np.ndarray, five: np.ndarray,
            mesh: np.ndarray | None = None) -> CaptureMeasures:
    """Every measure of one face: `frame` the source RGB frame, `box` its xyxy face box, `aligned` its 112x112
    ArcFace crop (any square size works), `five` its 5 landmarks, `mesh` the dense mesh if there is one."""
    gray = luma(aligned)
    inner = _region(gray, *_INNER)
    smooth = smoothed(gray)
    mean, std, under, over, dyn = exposure(inner)
    yaw, pitch, roll, span = head_pose(five)
    eyes, mouth = openness(mesh)
    centre = source_patch(frame, box, share=0.6)
    return CaptureMeasures(
        luminance_mean=mean, luminance_std=std, under_exposure=under, over_exposure=over, dynamic_range=dyn,
        illumination_uniformity=uniformity(inner),
        sharpness=sharpness(aligned), detail=detail(smooth), feature_detail=feature_detail(smooth),
        fine_detail=fine_detail(centre), noise=noise_sigma(inner), blockiness=blockiness(source_patch(frame, box)),
        yaw=yaw, eye_span=span, pitch=pitch, roll=roll, eyes_open=eyes, mouth_open=mouth)
