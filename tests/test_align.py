"""Alignment: the least-squares (Umeyama) similarity to the ArcFace template, and a fallback that never fails."""

import cv2
import numpy as np
import pytest

from cafi_stream.align import ARCFACE_TEMPLATE, align_face, similarity_to_template, umeyama


def residual(m: np.ndarray, src: np.ndarray, dst: np.ndarray) -> float:
    return float(((np.c_[src, np.ones(len(src))] @ np.asarray(m, np.float64).T - dst) ** 2).sum())


def test_umeyama_recovers_a_similarity_and_is_the_least_squares_fit():
    rng = np.random.default_rng(0)
    for _ in range(20):
        angle, scale, shift = rng.uniform(-1, 1), rng.uniform(0.3, 4), rng.uniform(-200, 200, 2)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        src = (ARCFACE_TEMPLATE @ rot.T) * scale + shift
        assert residual(umeyama(src, ARCFACE_TEMPLATE), src, ARCFACE_TEMPLATE) < 1e-6
        noisy = src + rng.normal(0, 3, src.shape)
        best = residual(umeyama(noisy, ARCFACE_TEMPLATE), noisy, ARCFACE_TEMPLATE)
        lmeds, _ = cv2.estimateAffinePartial2D(noisy.astype(np.float32), ARCFACE_TEMPLATE, method=cv2.LMEDS)
        assert best <= residual(lmeds, noisy, ARCFACE_TEMPLATE) + 1e-4
        for _ in range(5):   # no nearby similarity fits better
            a, ds, dt = rng.normal(0, 1e-3), rng.normal(0, 1e-3), rng.normal(0, 1e-2, 2)
            m = umeyama(noisy, ARCFACE_TEMPLATE).astype(np.float64)
            nudge = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * (1 + ds)
            assert residual(np.c_[nudge @ m[:, :2], m[:, 2] + dt], noisy, ARCFACE_TEMPLATE) >= best - 1e-6


@pytest.mark.parametrize("five", [np.full((5, 2), 50.0), np.full((5, 2), np.nan),
                                  np.array([[10, 10], [10, 10], [10, 10], [10, 10], [10, 10.000001]]),
                                  np.c_[np.arange(5.0), 2 * np.arange(5.0)]])
def test_degenerate_points_still_align(five):
    image = np.random.default_rng(1).integers(0, 255, (240, 320, 3), np.uint8)
    box = np.array([100, 60, 200, 160], np.float32)
    m = similarity_to_template(five, 112, box)
    assert m.shape == (2, 3) and np.isfinite(m).all()
    assert align_face(image, five, 112, box).shape == (112, 112, 3)
    assert np.isfinite(similarity_to_template(five, 112)).all()   # no box either
    if not np.isfinite(five).all() or np.ptp(five, axis=0).max() < 1e-3:   # no spread: the box is the crop
        np.testing.assert_allclose(m, [[1.12, 0, -112], [0, 1.12, -67.2]], rtol=1e-5)


def test_the_iqa_crop_samples_the_box_where_a_warp_would():
    """The IQA crop is resized from whole pixels for speed, but lands at the box's exact sub-pixel place and scale:
    on a real photo (smoothed, so that the difference measures place and scale rather than the kernels' ringing)
    it matches a warp of the box, enlarged and reduced, and is black outside the frame."""
    from conftest import FACES
    from cafi_stream.align import crop_face
    from cafi_stream.landmarks import FaceLandmarks

    image = cv2.cvtColor(cv2.imread(str(sorted(FACES.glob("*.jpg"))[0])), cv2.COLOR_BGR2RGB)
    image = cv2.GaussianBlur(image, (0, 0), 1.5)
    h, w = image.shape[:2]
    whole = FaceLandmarks(None, np.zeros((5, 2)), np.float32([[-1e4, -1e4], [1e4, -1e4], [1e4, 1e4], [-1e4, 1e4]]))
    rng = np.random.default_rng(0)
    errors = []
    for side in (0.11 * min(h, w), 0.23 * min(h, w), 450.3):
        for _ in range(4):
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            crop = crop_face(image, np.array([x0, y0, x0 + side, y0 + side], np.float32), whole).masked
            s = 384 / side
            warp = cv2.warpAffine(image, np.float32([[s, 0, -x0 * s], [0, s, -y0 * s]]), (384, 384),
                                  flags=cv2.INTER_CUBIC if s > 1 else cv2.INTER_LINEAR)
            errors.append(np.abs(crop[8:-8, 8:-8].astype(float) - warp[8:-8, 8:-8]).mean())
    # grey levels; a crop half a source pixel off (the whole-pixel resize before) gave 0.72 and 2.75
    assert np.mean(errors) < 0.5 and max(errors) < 1.5
    crop = crop_face(image, np.array([-100, -100, 100, 100], np.float32), whole).masked   # a quarter in the frame
    assert crop[:180, :180].max() == 0 and crop[200:, 200:].mean() > 20
