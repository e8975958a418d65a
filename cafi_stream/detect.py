"""Stage 2: face detection. Frames go in; `Detections` (square boxes, scores, 5 keypoints where the model gives them)
come out.

Detectors are entries of a registry (`DETECTORS`), each with its licence and what it gives:
- `scrfd_2.5g`: SCRFD-2.5G with 5 keypoints (ONNX), on the scoring engines' backends (ONNX Runtime CPU/CUDA,
  TensorRT, torch), batched over frames;
- `yunet`: YuNet with 5 keypoints, through OpenCV's `cv2.FaceDetectorYN` (CPU);
- `mediapipe`: mediapipe's full-range detector (the `mediapipe` extra, CPU). Its 6 points are not the 5 used for
  alignment, so the face mesh supplies those.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import cv2
import numpy as np

from ._native import native_stderr_silenced
from .backend import nchw
from .config import DetectConfig
from .errors import InputError, ModelError
from .models import ModelSpec, resolve_named, sha256_of

log = logging.getLogger(__name__)

_NO_POINTS = np.zeros((0, 5, 2), np.float32)


@dataclass(frozen=True)
class Detections:
    """Faces found in one frame. `xyxy` is each face's square source box in source pixels; `five` the 5 alignment
    points (right eye, left eye, nose tip, right and left mouth corner, the subject's sides), NaN where the
    detector gives none."""

    xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    five: np.ndarray = field(default_factory=lambda: _NO_POINTS)

    def __post_init__(self):
        n = len(self.confidence)
        if self.xyxy.shape != (n, 4) or self.five.shape != (n, 5, 2):
            raise ValueError(f"Detections: {n} scores, boxes {self.xyxy.shape}, points {self.five.shape}")

    def __len__(self) -> int:
        return len(self.confidence)

    def __getitem__(self, index) -> "Detections":
        """A subset by boolean mask, index array or slice."""
        if isinstance(index, (int, np.integer)):
            index = [index]
        return Detections(self.xyxy[index], self.confidence[index], self.five[index])

    @property
    def side(self) -> np.ndarray:
        return self.xyxy[:, 2] - self.xyxy[:, 0]

    @property
    def has_points(self) -> np.ndarray:
        return np.isfinite(self.five).all(axis=(1, 2))


def square_boxes(xyxy: np.ndarray, scale: float) -> np.ndarray:
    """The square around each box's centre whose side is `scale` times the box's longer side."""
    centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    half = np.maximum(xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1])[:, None] * scale / 2
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) intersection over union of two sets of xyxy boxes."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(axis=2)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(axis=1), (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / (area_a[:, None] + area_b[None] - inter)


def match_faces(ref: Detections, other: Detections, min_iou: float = 0.5) -> list[tuple[int, int, float]]:
    """Each face of `ref` and the face of `other` that overlaps it most, if by `min_iou`: (i, j, keypoint error),
    the error being the 5 points' mean distance over the `ref` face's side."""
    if not len(ref) or not len(other):
        return []
    iou = box_iou(ref.xyxy, other.xyxy)
    return [(i, int(j), float(np.linalg.norm(ref.five[i] - other.five[j], axis=1).mean() / ref.side[i]))
            for i, j in enumerate(iou.argmax(axis=1)) if iou[i, j] >= min_iou]


def detection_stride(fps: float, rate: float) -> int:
    """Detect on every n-th frame so that detections come at about `rate` per second (0: every frame)."""
    return 1 if rate <= 0 or fps <= rate else max(1, round(fps / rate))


class Detector(Protocol):
    name: str
    backend: str       # where it runs: "ort/cpu", "tensorrt/cuda", "opencv/cpu", ...
    size: int | None   # the longer side it reads frames at (never scaled up); None: the whole frame
    precision: str     # the weights that run: "fp32", or "int8" (SCRFD on ONNX Runtime's CPU provider)

    def detect(self, images: Sequence[np.ndarray], scale: float = 1.0) -> list[Detections]:
        """RGB frames (all of one size), each `scale` times its source's size -> one `Detections` per frame, in
        source pixels."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class DetectorSpec:
    name: str
    licence: str
    keypoints: bool                  # gives the 5 alignment points itself
    # How much the model's own box is widened into the square face box (forehead to chin): calibrated so that every
    # detector gives about the same side for the same face, since --min-face and the IQA crop are measured on it.
    box_scale: float
    factory: Callable[["DetectorSpec", DetectConfig, Path | None, str, str], Detector]
    model: ModelSpec | None = None   # the ONNX file, for detectors that have one


def input_scale(width: int, height: int, size: int | None, min_size: int = 0, face_scale: float = math.inf) -> float:
    """The scale a detector reads a frame at: `face_scale` (what makes the least face worth scoring just large
    enough to find), its longer side kept between `min_size` and `size`, and never up (SCRFD misses faces that fill
    an enlarged frame). `size` None: the whole frame."""
    if size is None:
        return 1.0
    longer = max(width, height)
    return min(1.0, size / longer, max(min_size / longer, face_scale))


def _padded(image: np.ndarray) -> np.ndarray:
    """The network input: the frame at the top left of a black canvas whose sides are multiples of 32."""
    h, w = image.shape[:2]
    canvas = np.zeros((max(32, math.ceil(h / 32) * 32), max(32, math.ceil(w / 32) * 32), 3), np.uint8)
    canvas[:h, :w] = image
    return canvas


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.4) -> np.ndarray:
    if not len(scores):
        return np.zeros((0,), np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return np.asarray(cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), 0.0, iou), np.int64).reshape(-1)


def dynamic_onnx(path: Path, sha256: str, out_dir: Path) -> Path:
    """A copy of a fully convolutional detector whose batch, height and width are free. The published file fixes
    them at 1x640x640, down to its upsampling layers' output sizes, which become a scale of 2."""
    import onnx
    from onnx import numpy_helper

    from .outdir import atomic_write

    out = out_dir / f"{path.stem}_{sha256[:16]}_dynamic.onnx"
    if out.is_file():
        return out
    model = onnx.load(str(path))
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    for node in graph.node:
        # The feature pyramid upsamples stride 32 to 16 and 16 to 8 (20->40->80 at 640): a scale of 2.
        if node.op_type == "Resize" and len(node.input) == 4 and node.input[3] in constants:
            scale = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), f"{node.name}_scales")
            graph.initializer.append(scale)
            node.input[2], node.input[3] = scale.name, ""
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    del graph.value_info[:]
    for value in (*model.graph.input, *model.graph.output):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis != 1:   # channels stay fixed
                dim.Clear()
                dim.dim_param = f"{value.name}_{axis}"
    atomic_write(out, model.SerializeToString())
    return out


# Activation ranges for an 8-bit detector, fitted by scripts/fit_int8.py on the fit clips only: one file per
# published detector file, named by its checksum (`calibration_file`), in ONNX Runtime's calibration-cache format.
CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"


def calibration_file(name: str, sha256: str) -> Path:
    return CALIBRATION_DIR / f"{name}_{sha256[:16]}.json"


def opset13(path: Path):
    """The ONNX graph at opset 13, which per-channel quantization needs (the published SCRFD file is at 11)."""
    import onnx
    from onnx import version_converter

    return version_converter.convert_version(onnx.load(str(path)), 13)


def int8_options() -> dict:
    """How the 8-bit detector is quantized (QDQ for ONNX Runtime's CPU provider), for the build and for the fit of
    its ranges. Weights per output channel in 7 bits (`reduce_range`): x86 CPUs without VNNI (AVX2 alone) sum pairs
    of u8 x s8 products in saturating 16-bit registers, which doubled SCRFD's keypoint error on an AVX2 machine
    (median 0.32% of the face's side against 0.21%, `scripts/fit_int8.py --check`); 7 bits cannot saturate."""
    from onnxruntime.quantization import QuantFormat, QuantType

    return dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def int8_onnx(dynamic: Path, ranges: Path, out_dir: Path) -> Path:
    """The dynamic detector with 8-bit activations and 7-bit weights (`int8_options`): ~2.5x faster on CPU. The
    activations' ranges come from `ranges`; the build takes ~1 s, once."""
    import hashlib

    from onnxruntime.quantization import quantize_static

    options = int8_options()
    # named by the ranges and the options, so that a change of either builds a new graph instead of reusing one
    key = hashlib.sha256(ranges.read_bytes() + repr(sorted(options.items())).encode()).hexdigest()[:16]
    out = out_dir / f"{dynamic.stem}_int8_{key}.onnx"
    if out.is_file():
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        quantize_static(opset13(dynamic), tmp, None, calibration_cache_path=ranges, **options)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class ScrfdDetector:
    """SCRFD with keypoints (insightface's design): 2 anchors per cell at strides 8, 16 and 32; outputs score
    logits, box distances and keypoint offsets in units of the stride."""

    STRIDES = (8, 16, 32)

    def __init__(self, spec: DetectorSpec, cfg: DetectConfig, path: Path, device: str, backend: str):
        from .backend import ModelSource, create_engine, engines_dir

        self.name, self.box_scale, self.size = spec.name, spec.box_scale, cfg.size
        p = min(max(cfg.min_confidence, 1e-6), 1 - 1e-6)
        self.min_logit = math.log(p / (1 - p))   # the model gives logits: compare before the sigmoid
        digest = sha256_of(path)
        onnx_path, self.precision = dynamic_onnx(path, digest, engines_dir()), "fp32"
        if cfg.precision == "int8":
            onnx_path, self.precision = self._int8(spec, onnx_path, digest, device, backend)
        source = ModelSource(name=f"{spec.name}_{self.precision}", onnx_path=onnx_path, sha256=digest,
                             input_shape=(3, cfg.size, cfg.size), dynamic_hw=True)
        self.engine = create_engine(source, backend, device, max_batch=cfg.batch)
        self.backend = f"{self.engine.backend}/{self.engine.device}"

    @staticmethod
    def _int8(spec: DetectorSpec, dynamic: Path, digest: str, device: str, backend: str) -> tuple[Path, str]:
        """The 8-bit graph and "int8" where it can run (ONNX Runtime on CPU, a file with fitted ranges); else
        the float graph and "fp32", and why in the log."""
        from .backend import choose_backend

        ranges = calibration_file(spec.name, digest)
        if device != "cpu" or choose_backend(backend, device) != "ort":
            why = "it runs on ONNX Runtime's CPU provider only"
        elif not ranges.is_file():
            why = f"no fitted activation ranges for this file ({ranges.name})"
        else:
            try:
                return int8_onnx(dynamic, ranges, dynamic.parent), "int8"
            except (ImportError, TypeError, ValueError, KeyError) as e:   # an ONNX Runtime without the cache API
                why = f"quantization failed ({e})"
        log.info("detect.precision = int8: %s; the detector runs in float", why)
        return dynamic, "fp32"

    def detect(self, images: Sequence[np.ndarray], scale: float = 1.0) -> list[Detections]:
        if not len(images):
            return []
        outs = self.engine.run(nchw(np.stack([_padded(image) for image in images]), 127.5, 128.0))
        n = len(self.STRIDES)
        per_image: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in images]
        for level, stride in enumerate(self.STRIDES):
            logits, dist, kps = outs[level], outs[n + level], outs[2 * n + level]
            anchors, gh, gw = logits.shape[1:]
            for i in range(len(images)):
                a, r, c = np.nonzero(logits[i] > self.min_logit)
                if not len(a):
                    continue
                centre = np.stack([c, r], axis=1).astype(np.float32) * stride   # an anchor's centre: its cell's corner
                d = dist[i].reshape(anchors, 4, gh, gw)[a, :, r, c] * stride
                k = kps[i].reshape(anchors, 10, gh, gw)[a, :, r, c].reshape(-1, 5, 2) * stride + centre[:, None]
                score = 1 / (1 + np.exp(-logits[i][a, r, c]))
                per_image[i].append((np.concatenate([centre - d[:, :2], centre + d[:, 2:]], axis=1), score, k))
        results = []
        for found in per_image:
            if not found:
                results.append(Detections())
                continue
            boxes, scores, points = (np.concatenate(parts) for parts in zip(*found))
            keep = _nms(boxes, scores)
            results.append(Detections(square_boxes(boxes[keep] / scale, self.box_scale),
                                      scores[keep].astype(np.float32), (points[keep] / scale).astype(np.float32)))
        return results

    def close(self) -> None:
        pass


class YunetDetector:
    """YuNet through OpenCV's own post-processing (`cv2.FaceDetectorYN`), one frame at a time on CPU."""

    backend = "opencv/cpu"
    precision = "fp32"

    def __init__(self, spec: DetectorSpec, cfg: DetectConfig, path: Path, device: str, backend: str):
        self.name, self.box_scale, self.size = spec.name, spec.box_scale, cfg.size
        self._model = cv2.FaceDetectorYN.create(str(path), "", (cfg.size, cfg.size), cfg.min_confidence, 0.3, 5000)
        self._input: tuple[int, ...] | None = None

    def detect(self, images: Sequence[np.ndarray], scale: float = 1.0) -> list[Detections]:
        results = []
        for image in images:
            canvas = _padded(image)
            if self._input != canvas.shape:
                self._model.setInputSize((canvas.shape[1], canvas.shape[0]))
                self._input = canvas.shape
            _, faces = self._model.detect(np.ascontiguousarray(canvas[:, :, ::-1]))   # YuNet reads BGR
            if faces is None or not len(faces):
                results.append(Detections())
                continue
            geometry = faces[:, :14].astype(np.float32) / np.float32(scale)
            xyxy = np.concatenate([geometry[:, :2], geometry[:, :2] + geometry[:, 2:4]], axis=1)
            results.append(Detections(square_boxes(xyxy, self.box_scale), faces[:, 14].astype(np.float32),
                                      geometry[:, 4:14].reshape(-1, 5, 2)))
        return results

    def close(self) -> None:
        pass


class MediapipeDetector:
    """mediapipe's full-range detector (the short-range one misses ~100 px faces in 720p)."""

    backend = "mediapipe/cpu"
    precision = "fp32"
    size = None   # it scales frames itself

    def __init__(self, spec: DetectorSpec, cfg: DetectConfig, path: Path | None, device: str, backend: str):
        self.name, self.box_scale = spec.name, spec.box_scale
        try:
            with native_stderr_silenced():
                import mediapipe as mp

                self._model = mp.solutions.face_detection.FaceDetection(
                    model_selection=1, min_detection_confidence=cfg.min_confidence)
                self._model.process(np.zeros((64, 64, 3), np.uint8))   # graph start-up logs go to /dev/null too
        except ImportError as e:
            raise InputError("--detector mediapipe needs the mediapipe extra: pip install 'cafi-stream[mediapipe]'"
                             ) from e

    def detect(self, images: Sequence[np.ndarray], scale: float = 1.0) -> list[Detections]:
        return [self._one(image, scale) for image in images]

    def _one(self, image: np.ndarray, scale: float) -> Detections:
        h, w = image.shape[0] / scale, image.shape[1] / scale
        result = self._model.process(image)
        if not result.detections:
            return Detections()
        boxes = [(r.xmin * w, r.ymin * h, (r.xmin + r.width) * w, (r.ymin + r.height) * h)
                 for r in (d.location_data.relative_bounding_box for d in result.detections)]
        scores = np.asarray([d.score[0] for d in result.detections], np.float32)
        return Detections(square_boxes(np.asarray(boxes, np.float32), self.box_scale), scores,
                          np.full((len(scores), 5, 2), np.nan, np.float32))

    @staticmethod
    def model_file() -> Path | None:
        try:
            import mediapipe
        except ImportError:
            return None
        return (Path(mediapipe.__file__).parent / "modules" / "face_detection"
                / "face_detection_full_range_sparse.tflite")

    def close(self) -> None:
        self._model.close()


_INSIGHTFACE = "non-commercial research only (insightface model zoo)"

DETECTORS: dict[str, DetectorSpec] = {
    "scrfd_2.5g": DetectorSpec(
        name="scrfd_2.5g", licence=_INSIGHTFACE, keypoints=True, box_scale=0.98, factory=ScrfdDetector,
        model=ModelSpec(
            name="scrfd_2.5g", file_name="scrfd_2.5g_bnkps_640.onnx",
            urls=("https://bj.bcebos.com/paddlehub/fastdeploy/scrfd_2.5g_bnkps_shape640x640.onnx",),
            sha256="22fa39a6cbb01b35876c4d4bd46a9e85991f7a9190e3c8f39a4546420bb9f81a")),
    "yunet": DetectorSpec(
        name="yunet", licence="MIT (OpenCV Zoo)", keypoints=True, box_scale=1.09, factory=YunetDetector,
        model=ModelSpec(
            name="yunet", file_name="face_detection_yunet_2026may.onnx",
            sha256="ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0")),
    "mediapipe": DetectorSpec(
        # Its box runs from the brows to the mouth; 1.25 widens it to the whole face.
        name="mediapipe", licence="Apache-2.0 (mediapipe)", keypoints=False, box_scale=1.25,
        factory=MediapipeDetector),
}


def create_detector(cfg: DetectConfig, models_dir: Path, device: str = "cpu", backend: str = "auto"
                    ) -> tuple[Detector, DetectorSpec, Path | None]:
    """The detector `cfg.model` names (a registry name, or the path of a registered model's file)."""
    models = {name: spec.model for name, spec in DETECTORS.items() if spec.model is not None}
    if cfg.model not in DETECTORS and not Path(cfg.model).expanduser().is_file():
        raise ModelError(f"face detector '{cfg.model}' is neither a file nor a known detector ({', '.join(DETECTORS)})")
    if cfg.model in DETECTORS and DETECTORS[cfg.model].model is None:
        spec, path = DETECTORS[cfg.model], None
    else:
        path, model = resolve_named(cfg.model, models, models_dir, "face detector", must_be_known=True)
        spec = DETECTORS[model.name]
    detector = spec.factory(spec, cfg, path, device, backend)
    return detector, spec, path if path is not None else MediapipeDetector.model_file()
