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


def downscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Down by `factor`, then back up: the detail of a face that many times smaller."""
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
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
