"""Controlled image degradations of known severity, for evaluating face-quality rankers (not used by the pipeline).

Each function takes an RGB uint8 image and the degradation's own parameter; `apply(img, kind, level)` maps
levels 1 (mild) .. 3 (severe) to parameters through LEVELS, scaled to the image size where that matters.
"""

from __future__ import annotations

import cv2
import numpy as np


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigma)


def motion_blur(img: np.ndarray, length: int) -> np.ndarray:
    """Horizontal motion blur over `length` pixels."""
    n = max(1, int(length))
    k = np.zeros((n, n), np.float32)
    k[n // 2] = 1.0 / n
    return cv2.filter2D(img, -1, k)


def noise(img: np.ndarray, sigma: float, rng: np.random.Generator | None = None) -> np.ndarray:
    rng = rng if rng is not None else np.random.default_rng(0)
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def downscale(img: np.ndarray, factor: float) -> np.ndarray:
    """Down by `factor`, then back up: the detail of a face that many times smaller."""
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, int(w / factor)), max(1, int(h / factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def dark(img: np.ndarray, gain: float) -> np.ndarray:
    """Under-exposure: gain with a gamma that crushes the shadows more as the gain falls."""
    gamma = 1.0 + (1.0 - gain)
    return np.clip((img.astype(np.float32) / 255.0) ** gamma * gain * 255.0, 0, 255).astype(np.uint8)


def occlusion(img: np.ndarray, fraction: float) -> np.ndarray:
    """A dark bar across the eyes, `fraction` of the image high."""
    out = img.copy()
    h = img.shape[0]
    y, half = int(h * 0.42), int(h * fraction / 2)
    out[max(0, y - half):y + half] = 20
    return out


def yaw(img: np.ndarray, amount: float) -> np.ndarray:
    """A perspective warp that turns the face sideways (`amount` = how much one side shrinks)."""
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[0, 0], [w * (1 - amount), h * amount / 2], [w * (1 - amount), h * (1 - amount / 2)], [0, h]])
    return cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REPLICATE)


# Parameters of levels 1..3; sizes are for a 112-pixel face and scale with the image.
LEVELS = {
    "gauss": (gaussian_blur, (1.5, 3.0, 6.0), True),
    "motion": (motion_blur, (7, 13, 21), True),
    "noise": (noise, (12, 25, 45), False),
    "jpeg": (jpeg, (30, 15, 6), False),
    "downscale": (downscale, (3, 5, 8), False),
    "dark": (dark, (0.45, 0.25, 0.12), False),
    "occlusion": (occlusion, (0.14, 0.24, 0.4), False),
    "yaw": (yaw, (0.12, 0.22, 0.32), False),
}
KINDS = tuple(LEVELS)


def apply(img: np.ndarray, kind: str, level: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """`kind` in KINDS at `level` 1..3; "clean" or level 0 returns the image as it is."""
    if kind == "clean" or level <= 0:
        return img
    fn, params, scales = LEVELS[kind]
    p = params[level - 1]
    if scales:
        p = p * img.shape[0] / 112.0
        p = int(round(p)) if fn is motion_blur else p
    return fn(img, p, rng) if fn is noise else fn(img, p)


# -- whole-frame degradations as a camera makes them (scripts/eval_real.py).

def defocus(img: np.ndarray, radius: float) -> np.ndarray:
    """An out-of-focus lens: a disc (pillbox) kernel of `radius` pixels."""
    r = max(0.5, float(radius))
    n = 2 * int(np.ceil(r)) + 1
    yy, xx = np.mgrid[:n, :n] - n // 2
    k = (np.hypot(xx, yy) <= r).astype(np.float32)
    return cv2.filter2D(img, -1, k / k.sum(), borderType=cv2.BORDER_REFLECT)


def shake(img: np.ndarray, length: float, angle: float) -> np.ndarray:
    """Camera-shake motion blur: a line kernel `length` pixels long at `angle` degrees."""
    n = max(3, int(round(length)) | 1)
    k = np.zeros((n, n), np.float32)
    c = n // 2
    dx, dy = np.cos(np.radians(angle)) * c, np.sin(np.radians(angle)) * c
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1,
             cv2.LINE_AA)
    return cv2.filter2D(img, -1, k / k.sum(), borderType=cv2.BORDER_REFLECT)


def low_light(img: np.ndarray, exposure: float, rng: np.random.Generator, full_well: float = 2000.0,
              read_noise: float = 3.0) -> np.ndarray:
    """Too little light: the scene's linear light times `exposure` is counted as photons (shot noise) plus read
    noise, then the camera's gain lifts it part of the way back (to exposure ** 0.4), amplifying the noise."""
    lin = (img.astype(np.float32) / 255.0) ** 2.2 * exposure * full_well
    electrons = rng.poisson(lin).astype(np.float32) + rng.normal(0, read_noise, img.shape).astype(np.float32)
    out = np.clip(electrons / (exposure * full_well) * exposure ** 0.4, 0, 1) ** (1 / 2.2)
    return (out * 255 + 0.5).astype(np.uint8)


def sensor_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Read and thermal noise: Gaussian, independent per pixel and channel, `sigma` in 8-bit levels."""
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def occluder(img: np.ndarray, box, size: float, place: tuple[float, float] = (0.5, 0.6),
             tone=(196, 150, 120)) -> np.ndarray:
    """A hand-sized, skin-toned ellipse `size` face-widths across, centred at `place` (fractions of the face box
    `box`, xyxy), shaded so that it is not a flat patch."""
    out = img.copy()
    x1, y1, x2, y2 = (float(v) for v in box)
    w = x2 - x1
    cx, cy = x1 + place[0] * w, y1 + place[1] * (y2 - y1)
    axes = (max(2, int(w * size / 2)), max(2, int(w * size * 0.65)))
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.ellipse(mask, (int(cx), int(cy)), axes, 20.0, 0, 360, 255, -1)
    ys = np.linspace(1.1, 0.8, img.shape[0], dtype=np.float32)[:, None, None]
    hand = np.clip(np.array(tone, np.float32) * ys, 0, 255).astype(np.uint8)
    m = cv2.GaussianBlur(mask, (0, 0), 1.5).astype(np.float32)[..., None] / 255.0
    return (out * (1 - m) + np.broadcast_to(hand, out.shape) * m).astype(np.uint8)


# Kinds of CAMERA and their parameters at levels 1..3, for a 256-pixel frame.
CAMERA = {
    "defocus": (1.5, 2.5, 4.0),       # disc radius, px
    "shake": (6, 10, 16),             # blur length, px (random angle)
    "low_light": (0.25, 0.1, 0.04),   # share of the light that reaches the sensor
    "noise": (7, 13, 22),             # sigma, 8-bit levels
    "jpeg": (15, 8, 4),               # JPEG quality
    "low_res": (2.0, 3.0, 4.5),       # down-scaling factor
    "occluder": (0.35, 0.5, 0.65),    # occluder width in face widths
}
CAMERA_KINDS = tuple(CAMERA)


def camera(img: np.ndarray, kind: str, level: int, rng: np.random.Generator, face_box=None,
           angle: float = 0.0, place: tuple[float, float] = (0.5, 0.6)) -> np.ndarray:
    """`kind` of CAMERA at `level` 1..3 over the whole frame; "clean" or level 0 returns it as it is. The occluder
    needs the face box; `angle` (shake) and `place` (occluder) stay fixed for a segment, as a real one would."""
    if kind == "clean" or level <= 0:
        return img
    p = CAMERA[kind][level - 1]
    scale = img.shape[0] / 256.0
    if kind == "defocus":
        return defocus(img, p * scale)
    if kind == "shake":
        return shake(img, p * scale, angle)
    if kind == "low_light":
        return low_light(img, p, rng)
    if kind == "noise":
        return sensor_noise(img, p, rng)
    if kind == "jpeg":
        return jpeg(img, int(p))
    if kind == "low_res":
        return downscale(img, p)
    if face_box is None:
        return img
    return occluder(img, face_box, p, place)
