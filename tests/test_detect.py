"""Face detectors with keypoints on real frames: SCRFD on ONNX Runtime and torch, YuNet, batching, the keypoint
mask, and whole runs with each detector."""

import contextlib
import json

import av
import numpy as np
import pytest

from cafi_stream.cascade import yaw_ratio
from cafi_stream.decode import VideoFrame
from cafi_stream.detect import Detections
from cafi_stream.landmarks import keypoint_landmarks
from conftest import FR_MODEL, SHARED, VIDEO, face_analysis, read_rows, run_cli


@pytest.fixture(scope="module")
def frames():
    """Every 15th frame of the Hamilton clip (a stage face, then small audience faces) and of a 1080p street."""
    out = []
    for path in (VIDEO, SHARED / "real" / "videos" / "street_1080p_multiface.mp4"):
        with av.open(str(path)) as c:
            out.append([f.to_ndarray(format="rgb24") for i, f in enumerate(c.decode(video=0)) if i % 15 == 0][:8])
    return out


def _frontal(dets: Detections) -> np.ndarray:
    """Faces of at least 60 px (small faces' points are noisy) turned less than about 30 degrees."""
    return (dets.side >= 60) & np.array([abs(yaw_ratio(p)) < 0.25 for p in dets.five], bool)


def _plausible(dets: Detections) -> None:
    """Keypoints inside their box; on frontal faces, eyes above the mouth and the subject's right eye on the
    image's left (a profile puts both eyes on one side)."""
    assert dets.has_points.all()
    x1, y1, x2, y2 = dets.xyxy.T
    inside = ((dets.five[..., 0] >= x1[:, None]) & (dets.five[..., 0] <= x2[:, None])
              & (dets.five[..., 1] >= y1[:, None]) & (dets.five[..., 1] <= y2[:, None]))
    assert inside.mean() > 0.95
    front = _frontal(dets)
    assert front.sum() >= 5
    assert (dets.five[front, :2, 1].max(1) < dets.five[front, 3:, 1].min(1)).all()
    assert (dets.five[front, 0, 0] < dets.five[front, 1, 0]).all()


@pytest.mark.parametrize("model", ["scrfd_2.5g", "yunet"])
def test_detector_finds_faces_with_keypoints(model, frames):
    analysis = face_analysis(model=model)
    try:
        for clip in frames:
            found = [analysis(f) for f in clip]
            assert sum(len(d) > 0 for d in found) >= 0.75 * len(clip)
            _plausible(Detections(*(np.concatenate(parts) for parts in
                                    zip(*((d.xyxy, d.confidence, d.five) for d in found)))))
        street = [analysis(f) for f in frames[1]]
        assert max(len(d) for d in street) >= 4   # 5-6 people walk towards the camera
    finally:
        analysis.close()


def test_scrfd_backends_and_batches_agree(frames):
    """ONNX Runtime and torch (the graph converted) find the same faces; a batch of frames gives what frames one
    at a time give."""
    ort_, torch_ = face_analysis(model="scrfd_2.5g", precision="fp32"), None
    try:
        from cafi_stream.analyse import FaceAnalysis
        from cafi_stream.config import load_config
        from cafi_stream.models import default_models_dir

        # torch has no 8-bit graph: asked for one, it runs the float graph.
        torch_ = FaceAnalysis(load_config(overrides={"detect": {"model": "scrfd_2.5g", "precision": "int8"}}).detect,
                              default_models_dir(), backend="torch")
        assert torch_.detector.engine.backend == "torch" and ort_.detector.engine.backend == "ort"
        assert torch_.detector.precision == ort_.detector.precision == "fp32"
        clip = frames[0]
        one = [ort_(f) for f in clip]
        batch = ort_.detect(clip)
        other = torch_.detect(clip)
        for a, b, c in zip(one, batch, other):
            assert len(a) == len(b) == len(c)
            np.testing.assert_allclose(a.xyxy, b.xyxy, atol=0.5)
            np.testing.assert_allclose(a.xyxy, c.xyxy, atol=1.0)
            np.testing.assert_allclose(a.five, c.five, atol=1.0)
    finally:
        ort_.close()
        if torch_ is not None:
            torch_.close()


def test_a_shared_detector_joins_the_calls_of_many_threads(frames):
    """serve's cameras share one detector: whole frames of two sizes (360p and 1080p) and crops around faces, from
    8 threads at once, are joined into fewer calls of one shape each, and every thread gets what the detector alone
    finds in its own frame."""
    import threading

    analysis = face_analysis(model="scrfd_2.5g")
    try:
        joined = analysis.joined(max_batch=16)
        work = [(f, analysis(f)) for clip in frames for f in clip[:4]]
        work = [(f, dets) for f, dets in work if len(dets)]
        assert {f.shape for f, _ in work} == {(360, 640, 3), (1080, 1920, 3)}
        start, found, crops = threading.Barrier(len(work)), {}, {}

        def call(i, frame, dets):
            start.wait()
            found[i] = joined(frame)
            crops[i] = joined.around(VideoFrame(0, 0.0, frame), dets.xyxy, min_iou=0.5)

        threads = [threading.Thread(target=call, args=(i, *w)) for i, w in enumerate(work)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (frame, dets) in enumerate(work):
            assert len(found[i]) == len(dets)
            np.testing.assert_allclose(found[i].xyxy, dets.xyxy, atol=0.5)
            alone = analysis.around(VideoFrame(0, 0.0, frame), dets.xyxy, min_iou=0.5)
            for a, b in zip(crops[i], alone):
                assert len(a) == len(b)
                np.testing.assert_allclose(a.five, b.five, atol=0.5)
        engine = joined.detector.engine
        assert engine.joined_rows == sum(1 + len(dets) for _, dets in work)   # each frame, and a crop per face
        assert engine.joined_calls < engine.joined_rows
        assert analysis.detector.engine is not engine   # the detector as loaded is left as it was
    finally:
        analysis.close()


def test_int8_detector_finds_what_the_float_one_finds(frames):
    """The 8-bit SCRFD, built from the package's fitted ranges, finds the faces the float one finds on real
    frames (none of them calibration clips), with keypoints within 1.5% of the face's side."""
    from cafi_stream.detect import match_faces

    fp32, int8 = face_analysis(model="scrfd_2.5g", precision="fp32"), face_analysis(model="scrfd_2.5g",
                                                                                       precision="int8")
    try:
        assert int8.detector.precision == "int8" and fp32.detector.precision == "fp32"
        found = total = 0
        errors = []
        for clip in frames:
            for f in clip:
                ref = fp32(f)
                ref = ref[ref.side >= 40]
                matched = match_faces(ref, int8(f))
                total += len(ref)
                found += len(matched)
                errors += [err for _, _, err in matched]
        assert total >= 20 and found >= 0.95 * total
        assert np.median(errors) < 0.01 and np.percentile(errors, 90) < 0.015
    finally:
        fp32.close()
        int8.close()


def test_int8_needs_fitted_ranges_for_the_very_file(tmp_path, monkeypatch, caplog):
    """A detector file without fitted ranges (another SCRFD build) runs in float, and the log says why."""
    import logging

    import cafi_stream.detect as detect

    monkeypatch.setattr(detect, "CALIBRATION_DIR", tmp_path)
    with caplog.at_level(logging.INFO, logger="cafi_stream.detect"):
        analysis = face_analysis(model="scrfd_2.5g", precision="int8")
    try:
        assert analysis.detector.precision == "fp32"
        assert "no fitted activation ranges" in caplog.text
    finally:
        analysis.close()


def test_detections_container_checks_lengths_and_takes_masks():
    d = Detections(np.array([[0, 0, 10, 10], [5, 5, 25, 25]], np.float32), np.array([0.9, 0.4], np.float32),
                   np.full((2, 5, 2), np.nan, np.float32))
    kept = d[d.confidence > 0.5]
    assert len(kept) == 1 and kept.side.tolist() == [10.0] and not kept.has_points.any()
    with pytest.raises(ValueError):
        Detections(d.xyxy, d.confidence[:1], d.five)


def test_keypoint_mask_covers_the_face_and_follows_roll(frames):
    """On the largest frontal face of the street clip, the ellipse holds the 5 points and fills most of the box."""
    analysis = face_analysis(model="scrfd_2.5g")
    dets = max((d[_frontal(d)] for d in (analysis(f) for f in frames[1])), key=lambda d: d.side.max(initial=0))
    analysis.close()
    i = int(np.argmax(dets.side))
    lm = keypoint_landmarks(dets.five[i])
    import cv2

    poly = lm.oval.astype(np.float32).reshape(-1, 1, 2)
    assert all(cv2.pointPolygonTest(poly, tuple(map(float, p)), False) > 0 for p in lm.five)
    x1, y1, x2, y2 = dets.xyxy[i]
    inside = ((lm.oval[:, 0] >= x1 - 0.1 * (x2 - x1)) & (lm.oval[:, 0] <= x2 + 0.1 * (x2 - x1))
              & (lm.oval[:, 1] >= y1 - 0.1 * (y2 - y1)) & (lm.oval[:, 1] <= y2 + 0.1 * (y2 - y1)))
    assert inside.mean() > 0.9
    area = cv2.contourArea(poly)
    assert 0.35 < area / float((x2 - x1) * (y2 - y1)) < 0.9
    # Rolled 30 degrees about the eyes' midpoint, the outline turns with the points.
    c = (lm.five[0] + lm.five[1]) / 2
    t = np.deg2rad(30)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]], np.float32)
    turned = keypoint_landmarks((lm.five - c) @ rot.T + c)
    np.testing.assert_allclose(turned.oval, (lm.oval - c) @ rot.T + c, atol=0.05)


@pytest.mark.parametrize("model", ["scrfd_2.5g", "yunet"])
def test_pipeline_runs_with_a_keypoint_detector(model, tmp_path):
    """The whole run on the Hamilton clip: the main face is one track whose kept faces were aligned on the
    detector's own keypoints (no mesh call)."""
    out = tmp_path / "out"
    proc = run_cli(VIDEO, "--topk", 3, "--iqa", "none", "--fr-model", FR_MODEL, "--detector", model, "--out", out,
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engines"]["face_detector"] == model
    assert summary["engines"]["face_detector_precision"] == ("int8" if model == "scrfd_2.5g" else "fp32")
    assert summary["models"]["face_detector"]["name"] == model and "face_mesh" not in summary["models"]
    rows = read_rows(out)
    tracks = {r["track_id"] for r in rows}
    # The performer's close-up (frames ~90-215) is the one face large enough to keep for most of the clip.
    main = max(tracks, key=lambda t: sum(r["track_id"] == t for r in rows))
    frames = sorted(r["frame_index"] for r in rows if r["track_id"] == main)
    assert len(frames) == 3 and 80 <= frames[0] and frames[-1] <= 230
    assert len(tracks) <= 4


def test_pipeline_runs_with_the_detector_on_torch(tmp_path):
    """--backend torch: SCRFD (converted from ONNX) and the recognition backbone both run in torch."""
    out = tmp_path / "out"
    proc = run_cli(VIDEO, "--topk", 2, "--iqa", "none", "--fr-model", FR_MODEL, "--detector", "scrfd_2.5g",
                   "--backend", "torch", "--max-frames", 150, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engines"]["fr_backbone"] == summary["engines"]["face_detector_backend"] == "torch/cpu"
    assert summary["engines"]["face_detector_precision"] == "fp32"   # the default int8 runs on ONNX Runtime only
    rows = read_rows(out)
    assert rows and all(np.isfinite(r["landmarks"]).all() for r in rows)


def test_scrfd_graph_is_made_free_in_batch_height_and_width(tmp_path):
    """The published SCRFD fixes 1x640x640 down to its upsampling sizes; the rewritten graph runs a batch of two
    16:9 frames and gives each what it gives alone."""
    import onnxruntime as ort

    from cafi_stream.detect import DETECTORS, dynamic_onnx
    from cafi_stream.models import sha256_of
    from conftest import OPTIONAL_MODELS

    src = OPTIONAL_MODELS / DETECTORS["scrfd_2.5g"].model.file_name
    path = dynamic_onnx(src, sha256_of(src), tmp_path)
    assert dynamic_onnx(src, sha256_of(src), tmp_path) == path   # made once
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, 384, 640)).astype(np.float32)
    both = session.run(None, {session.get_inputs()[0].name: x})
    one = session.run(None, {session.get_inputs()[0].name: x[1:]})
    assert [o.shape[2:] for o in both[:3]] == [(48, 80), (24, 40), (12, 20)]
    for a, b in zip(both, one):
        np.testing.assert_allclose(a[1:], b, atol=1e-4)


def test_frames_detected_ahead_in_one_call_keep_what_one_call_each_keeps():
    """`detect.ahead`: the full-frame detections of 4 detection frames are one detector call (as a GPU runs them
    best), and the run keeps the same faces of the same tracks as with a call per frame, on the 1080p street (the
    whole clip: with `max_frames`, detecting ahead reads frames the run never handles)."""
    from cafi_stream.config import load_config
    from cafi_stream.pipeline import Models, process

    street = SHARED / "real" / "videos" / "street_1080p_multiface.mp4"
    kept, calls = {}, {}
    for ahead in (1, 4):
        cfg = load_config(overrides={"output": {"topk": 3}, "iqa": {"name": "none"}, "fr": {"model": str(FR_MODEL)},
                                     "faces": {"min_face": 40}, "detect": {"ahead": ahead}})
        models = Models.load(cfg)
        engine, sizes = models.faces.detector.engine, []
        run = engine.run
        engine.run = lambda x, run=run, sizes=sizes: sizes.append(x.shape) or run(x)
        try:
            kept[ahead] = sorted((r.track_id, k.face.frame_index, round(k.face.score, 4))
                                 for r in process(str(street), cfg, models) for k in r.faces)
        finally:
            models.close()
        full = max(s[2] * s[3] for s in sizes)
        calls[ahead] = [s[0] for s in sizes if s[2] * s[3] == full]   # frames per full-frame detection call
    assert len(kept[1]) >= 6 and kept[4] == kept[1]
    assert calls[1] and set(calls[1]) == {1}
    assert len(calls[4]) > 2 and set(calls[4][:-1]) == {4} and sum(calls[4]) == sum(calls[1])


def test_frames_held_for_a_batch_are_handed_on_before_a_decoding_error(frames):
    """A decoding error while frames wait for the rest of their batch: every frame decoded before it is still
    handed on, with its faces detected in one call, and then the error is raised."""
    from cafi_stream.analyse import DetectAhead
    from cafi_stream.errors import InputError

    street = [VideoFrame(i, i / 25, image) for i, image in enumerate(frames[1])]

    def decoded():
        yield from street[:5]
        raise InputError("corrupt packet")

    ahead = DetectAhead(face_analysis(), stride=1, ahead=8, timer=lambda stage: contextlib.nullcontext())
    handed = []
    with pytest.raises(InputError, match="corrupt packet"):
        for frame in ahead.frames(decoded()):
            handed.append(frame.index)
    assert handed == [0, 1, 2, 3, 4] and sorted(ahead.found) == handed
    faces = [ahead.take(f) for f in street[:5]]
    assert all(len(d) >= 3 for d in faces) and not ahead.found
