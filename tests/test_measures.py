"""Capture-quality measures on real faces: each moves the right way over 3 levels of its own degradation."""

import math

import cv2
import numpy as np
import pytest

from cafi_stream import degrade
from cafi_stream.align import similarity_to_template
from cafi_stream.measures import head_pose, measure, openness
from conftest import SHARED, face_analysis, read_rgb

REAL_FACES = SHARED / "real" / "faces"


@pytest.fixture(scope="module")
def faces():
    """(photo, face box, landmarks) of 12 real photos of different people, the largest face of each, through the
    mesh front end: eye and mouth opening need the mesh, and the degradations are placed on its boxes."""
    analysis = face_analysis(model="mediapipe")
    out, seen = [], set()
    for path in sorted(REAL_FACES.glob("*.jpg")):
        person = path.name.split("__")[0]
        if person in seen or person.startswith("multi_"):
            continue
        img = read_rgb(path)
        dets, lm = analysis.largest(img)
        if lm is not None:
            out.append((img, dets.xyxy[0], lm))
            seen.add(person)
    analysis.close()
    assert len(out) >= 8
    return out


def _scaled(fn, params):
    """A degrade function whose parameters are sizes for a 112-pixel face, applied at this face's size."""
    return lambda img, box, level: fn(img, params[level - 1] * (box[2] - box[0]) / 112)


def _kind(kind):
    fn, params, _ = degrade.LEVELS[kind]
    return lambda img, box, level: fn(img, params[level - 1])


def _bright(img, box, level):
    return np.clip(img.astype(np.float32) * (1.4, 1.8, 2.4)[level - 1], 0, 255).astype(np.uint8)


def _flat(img, box, level):   # contrast pulled towards mid-grey
    amount = (0.3, 0.55, 0.8)[level - 1]
    return np.clip(img.astype(np.float32) * (1 - amount) + 128 * amount, 0, 255).astype(np.uint8)


def _side_light(img, box, level, towards: int = 1):
    """Light falling off across the face, towards its right (`towards` 1) or left (-1) side in the image."""
    x = np.clip((np.arange(img.shape[1]) - box[0]) / (box[2] - box[0]), 0, 1)
    fall = (0.3, 0.55, 0.8)[level - 1] * (x if towards > 0 else 1 - x)
    return np.clip(img.astype(np.float32) * (1 - fall)[None, :, None], 0, 255).astype(np.uint8)


# measure: (degradation fn(img, box, level 1..3), the direction the measure must move)
PHOTOMETRIC = {
    "luminance_mean": (_kind("dark"), -1), "under_exposure": (_kind("dark"), +1), "over_exposure": (_bright, +1),
    "luminance_std": (_flat, -1), "dynamic_range": (_flat, -1), "illumination_uniformity": (_side_light, -1),
    "sharpness": (_scaled(degrade.gaussian_blur, (1.0, 2.0, 4.0)), -1), "noise": (_kind("noise"), +1),
    "detail": (_scaled(degrade.gaussian_blur, (1.0, 2.0, 4.0)), -1),
    "feature_detail": (lambda img, box, level: degrade.camera(img, "occluder", level, None, box, place=(0.5, 0.45)),
                       -1),
    "blockiness": (_kind("jpeg"), +1),
    # defocus discs of source pixels, whatever the face's size: what resampling to 112 pixels hides
    "fine_detail": (lambda img, box, level: degrade.defocus(img, (1.0, 1.5, 2.5)[level - 1]), -1),
}


@pytest.mark.parametrize("name", list(PHOTOMETRIC))
def test_photometric_measure_follows_its_degradation(name, faces):
    degradation, direction = PHOTOMETRIC[name]
    monotone = 0
    for img, box, lm in faces:
        m = similarity_to_template(lm.five, 112, box)
        aligned = cv2.warpAffine(img, m, (112, 112))
        if name == "illumination_uniformity":   # side light deepens the shadow side the face already has
            half = aligned[28:104, 22:90].mean(axis=(0, 2))
            side = 1 if half[34:].mean() < half[:34].mean() else -1
            degradation = lambda x, b, lv, side=side: _side_light(x, b, lv, side)  # noqa: E731
        values = [getattr(measure(img, box, aligned, lm.five, lm.mesh), name)]
        for level in (1, 2, 3):
            x = degradation(img, box, level)
            values.append(getattr(measure(x, box, cv2.warpAffine(x, m, (112, 112)), lm.five, lm.mesh), name))
        monotone += all(direction * d > 0 for d in np.diff(values))
    assert monotone >= 0.9 * len(faces), (name, monotone, len(faces))


def test_roll_follows_a_rotated_photo(faces):
    """Turning the photo by 8, 16 and 28 degrees turns the measured roll by as much (landmarks found afresh)."""
    analysis = face_analysis(model="mediapipe")
    errors = []
    for img, box, lm in faces:
        base = head_pose(lm.five)[2]
        h, w = img.shape[:2]
        centre = (float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2)
        for angle in (8, 16, 28):
            turned = cv2.warpAffine(img, cv2.getRotationMatrix2D(centre, angle, 1.0), (w, h),
                                    borderMode=cv2.BORDER_REPLICATE)
            _, lm2 = analysis.largest(turned)
            if lm2 is not None:   # counter-clockwise in the image: the eye line's angle falls
                errors.append(abs((base - head_pose(lm2.five)[2]) - angle))
    analysis.close()
    assert len(errors) >= 0.6 * 3 * len(faces)   # the detector misses some faces turned 28 degrees
    assert np.median(errors) < 2.0 and np.mean(np.array(errors) < 5) >= 0.9, errors


def _turn(five: np.ndarray, yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """The five points of a real face turned in 3D: the nose stands out of the eye-mouth plane by 0.6 eye
    distances (a typical face), then an orthographic view after rotating about the vertical or horizontal axis."""
    centre = five.mean(0)
    depth = np.array([0, 0, 0.6, 0, 0]) * np.linalg.norm(five[1] - five[0])
    pts = np.c_[five - centre, depth]
    a, b = math.radians(yaw_deg), math.radians(pitch_deg)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return (pts @ (rx @ ry).T)[:, :2] + centre


@pytest.mark.parametrize("axis", ["yaw", "pitch"])
def test_yaw_and_pitch_follow_a_turned_head(axis, faces):
    for _, _, lm in faces:
        angles = (10, 20, 35)
        values = [head_pose(_turn(lm.five, *((a, 0) if axis == "yaw" else (0, a))))[0 if axis == "yaw" else 1]
                  for a in (0, *angles)]
        assert all(d > 0 for d in np.diff(np.abs(np.array(values) - values[0]))), values


def test_eye_span_shrinks_as_the_head_turns_or_the_face_is_seen_aslant(faces):
    """Eye span falls with a real turn (landmarks of a 3-D head), and with the photo itself seen aslant (the cards'
    perspective warp at its strongest level, landmarks found afresh)."""
    analysis = face_analysis(model="mediapipe")
    drops = []
    for img, _, lm in faces:
        turned = [head_pose(_turn(lm.five, a, 0))[3] for a in (0, 15, 30, 45)]
        assert all(d < 0 for d in np.diff(turned)), turned
        _, lm2 = analysis.largest(_kind("yaw")(img, None, 3))
        if lm2 is not None:
            drops.append(1 - head_pose(lm2.five)[3] / head_pose(lm.five)[3])
    analysis.close()
    assert len(drops) >= 0.8 * len(faces) and np.mean(np.array(drops) > 0) >= 0.85, drops
    assert np.median(drops) > 0.05, drops


def test_eye_and_mouth_opening_follow_the_mesh(faces):
    """Eyelids closing (the lid points pulled onto the eye's corner line) and a mouth opening (lower lip down)."""
    lids = [160, 158, 153, 144, 385, 387, 373, 380]
    corners = {160: (33, 133), 158: (33, 133), 153: (33, 133), 144: (33, 133),
               385: (362, 263), 387: (362, 263), 373: (362, 263), 380: (362, 263)}
    for _, _, lm in faces:
        eyes, mouths = [], []
        for level in range(4):
            mesh = lm.mesh.astype(np.float64).copy()
            for i in lids:
                a, b = corners[i]
                mid = (mesh[a] + mesh[b]) / 2
                mesh[i] = mid + (mesh[i] - mid) * (1 - 0.3 * level)
            mesh[14] += np.array([0, 0.08 * level]) * np.linalg.norm(mesh[291] - mesh[61])
            e, m = openness(mesh)
            eyes.append(e)
            mouths.append(m)
        assert all(d < 0 for d in np.diff(eyes)) and all(d > 0 for d in np.diff(mouths)), (eyes, mouths)
    assert openness(None) == (None, None)


def test_cascade_proxy_sees_noise_that_detail_reads_as_detail(faces):
    """The cascade picks and vetoes IQA candidates by a proxy. Noise raises `detail`, so a noisy face beats its
    clean self on it; the learned fusion's pre-IQA score (Selector.proxy) orders the two as the fusion itself does
    over the whole track, and ranks the clean face first wherever the clean face is under the noise threshold."""
    from cafi_stream.fusion import FusionModel, signal_vector
    from cafi_stream.select import ScoredFace, Selector, SerfiqRule

    model = FusionModel.load(iqa=True)
    by_detail = agrees = clean_first = 0
    for i, (img, box, lm) in enumerate(faces):
        selector = Selector(3, 1.0, SerfiqRule(0.0), fusion="learned", model=model)
        m = similarity_to_template(lm.five, 112, box)
        proxies, details, signals = [], [], []
        for level in (0, 1, 3, 0, 2, 3):   # a track that swings between clean and noisy
            x = img if level == 0 else _kind("noise")(img, box, level)
            ms = measure(x, box, cv2.warpAffine(x, m, (112, 112)), lm.five, lm.mesh)
            signals.append(signal_vector(0.7, None, ms))
            proxies.append(selector.proxy(ScoredFace(i, 0, 0.0, box, 1.0, lm.five, 0.7, np.zeros(4), None, 0.0,
                                                     measures=ms, signals=signals[-1])))
            details.append(ms.detail)
        final = model.scores(np.stack(signals))
        by_detail += details[3] > details[5]
        agrees += (proxies[3] > proxies[5]) == (final[3] > final[5])
        clean_first += proxies[3] > proxies[5]
    assert by_detail == 0, by_detail                       # detail prefers every noisy face
    assert agrees >= 0.9 * len(faces), (agrees, len(faces))
    assert clean_first >= 0.5 * len(faces), (clean_first, len(faces))


def test_sample_gate_spends_serfiq_on_the_clean_face_of_each_window(faces):
    """Per track, SER-FIQ is spent on one face per `serfiq_window`, the one the capture measures rank best. In
    windows holding a real face (160 px, a talking head's size in 720p video) once clean and once degraded
    (noise, blur, JPEG, darkness at levels 2-3, in either order), the gate hands on one face per window, the
    ending track's last window too, and mostly the clean one: more often than by `detail` alone, which noise
    raises."""
    from cafi_stream.align import crop_face
    from cafi_stream.cascade import SampleGate
    from cafi_stream.fusion import FusionModel, TrackScores
    from cafi_stream.landmarks import keypoint_landmarks
    from cafi_stream.select import ScoredFace

    gates = {"fusion": SampleGate(0.3, TrackScores(FusionModel.load(iqa=True), ("serfiq", "iqa"))),
             "detail": SampleGate(0.3, None)}
    kinds = ("noise", "gauss", "jpeg", "dark")
    clean, released, windows = set(), {name: [] for name in gates}, 0
    for i, (img, box, lm) in enumerate(faces):
        r = 160 / float(box[2] - box[0])
        img, box, five = cv2.resize(img, None, fx=r, fy=r, interpolation=cv2.INTER_AREA), box * r, lm.five * r
        for w, kind in enumerate(kinds):
            windows += 1
            versions = [(img, True), (_kind(kind)(img, box, 2 + w % 2), False)]
            for j, (x, is_clean) in enumerate(versions if (i + w) % 2 else versions[::-1]):
                crops = crop_face(x, box, keypoint_landmarks(five))
                ms = measure(x, box, crops.aligned, five)
                pts = 0.3 * w + 0.1 * j + 0.05
                face = ScoredFace(i, round(pts * 100), pts, box, 1.0, five, math.nan, None, None, 0.0,
                                  proxy=ms.detail, measures=ms)
                if is_clean:
                    clean.add(id(face))
                for name, gate in gates.items():
                    released[name] += gate.submit(i, pts, face)
        for name, gate in gates.items():
            released[name] += gate.release(i)
    share = {}
    for name, gate in gates.items():
        assert len(released[name]) == windows and gate.skipped == windows
        share[name] = sum(id(f) in clean for f in released[name]) / windows
    assert share["fusion"] >= 0.8 and share["fusion"] > share["detail"], share
