#!/usr/bin/env python3
"""Fit the activation ranges of the 8-bit SCRFD detector (`detect.precision = "int8"`) and write them to
cafi_stream/calibration/, where `detect.int8_onnx` builds the 8-bit graph from them.

    scripts/fit_int8.py [--every N] [--check]

Which clips: eval_real's fit clips other than retalking_face1/2 (the voxceleb2 clips at even positions and
lia_vox_driving1). None of them is a clip that eval_real reports on, nor one that eval_detectors or
eval_detect_scale measure the detector on.

What the detector reads there is recorded as the pipeline makes it (`FaceAnalysis`: whole frames at the detection
scale, crops around each face at `detect.refine_px`), from:
- every N-th frame, as it is and with one of degrade.KINDS at a random level (cameras give both);
- mosaics of those frames, 2x2 to 8x8 on a 16:9 canvas: many small faces, as a wide camera sees them.
Ranges are each tensor's minimum and maximum over all of it (ONNX Runtime's MinMax calibration).

`--check` prints, for held-out clips (eval_real's report clips), how far the 8-bit detector's faces are from the
float one's: recall and keypoint error over the face's side.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cafi_stream import degrade  # noqa: E402
from cafi_stream.analyse import FaceAnalysis  # noqa: E402
from cafi_stream.backend import engines_dir  # noqa: E402
from cafi_stream.decode import VideoFrame  # noqa: E402
from cafi_stream.detect import calibration_file, dynamic_onnx, int8_options, match_faces, opset13  # noqa: E402
from cafi_stream.models import sha256_of  # noqa: E402
from eval_real import clips  # noqa: E402

EXCLUDED = ("retalking_face1", "retalking_face2")   # eval_detect_scale and eval_detectors measure on them
CANVAS = (416, 234)   # a 1080p frame at the default detection scale
SEED = 0


class Recorder:
    """An engine that keeps every input it runs."""

    def __init__(self, engine):
        self.engine, self.inputs = engine, []
        self.backend, self.device = engine.backend, engine.device

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        self.inputs.append(np.array(x, np.float32))
        return self.engine.run(x)


def frames_of(clip: Path, every: int) -> list[np.ndarray]:
    with av.open(str(clip)) as c:
        return [f.to_ndarray(format="rgb24") for i, f in enumerate(c.decode(video=0)) if i % every == 0]


def mosaic(images: list[np.ndarray], n: int) -> np.ndarray:
    w, h = CANVAS
    canvas = np.zeros((h, w, 3), np.uint8)
    side = h // n
    for k, img in enumerate(images[: n * (w // side)]):
        r, c = divmod(k, w // side)
        canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = cv2.resize(img, (side, side),
                                                                          interpolation=cv2.INTER_AREA)
    return canvas


def record(faces: FaceAnalysis, every: int) -> list[np.ndarray]:
    rng = np.random.default_rng(SEED)
    recorder = Recorder(faces.detector.engine)
    faces.detector.engine = recorder
    pictures = []
    for clip in clips("fit"):
        if clip.stem in EXCLUDED:
            continue
        for img in frames_of(clip, every):
            kind = degrade.KINDS[rng.integers(len(degrade.KINDS))]
            pictures += [img, degrade.apply(img, kind, int(rng.integers(1, 4)), rng)]
    for img in pictures:
        dets = faces(img)
        if len(dets):
            faces.around(VideoFrame(0, 0.0, img), dets.xyxy, min_iou=0.5)
    order = rng.permutation(len(pictures))
    for n in (2, 3, 4, 6, 8):
        for start in range(0, len(order), n * n * 2):
            faces(mosaic([pictures[i] for i in order[start:start + n * n * 2]], n))
    faces.detector.engine = recorder.engine
    return recorder.inputs


def fit(inputs: list[np.ndarray], dynamic: Path, out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    model = opset13(dynamic)
    name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(inputs)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {name: x}

    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(model, Path(tmp) / "int8.onnx", Reader(), calibration_cache_path=out, **int8_options())


def check(every: int) -> None:
    """Held-out clips: the 8-bit detector against the float one, at the pipeline's scale."""
    base, int8 = FaceAnalysis.configured(precision="fp32"), FaceAnalysis.configured(precision="int8")
    found = total = 0
    errors = []
    for clip in clips("report"):
        for img in frames_of(clip, every):
            ref = base(img)
            matched = match_faces(ref, int8(img))
            total += len(ref)
            found += len(matched)
            errors += [err for _, _, err in matched]
    print(f"held-out: {found}/{total} float faces found; keypoint error / side: median "
          f"{np.median(errors):.4f}, 90th pct {np.percentile(errors, 90):.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=10, help="one frame in this many")
    ap.add_argument("--check", action="store_true", help="only compare the 8-bit detector with the float one")
    args = ap.parse_args()
    if args.check:
        check(args.every)
        return 0
    faces = FaceAnalysis.configured(precision="fp32")
    path = Path(faces.files["face_detector"][1])
    digest = sha256_of(path)
    inputs = record(faces, args.every)
    out = calibration_file(faces.spec.name, digest)
    fit(inputs, dynamic_onnx(path, digest, engines_dir()), out)
    print(f"{len(inputs)} detector inputs -> {out.relative_to(ROOT)}")
    check(args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
