"""Inference backends behind one small protocol: TensorRT, ONNX Runtime and torch.

Every scoring network is described by a `ModelSource` (an ONNX file, and optionally a native torch module);
`create_engine` turns it into an `Engine` on the fastest backend available for the device.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "ort", "torch")


@dataclass(frozen=True)
class ModelSource:
    name: str                          # short name for cache files and logs ("dbcnn", "fr_backbone")
    onnx_path: Path                    # ONNX graph with a dynamic batch axis
    sha256: str                        # of the ONNX file: keys engine caches
    input_shape: tuple[int, int, int]  # C, H, W
    torch_module: Callable[[], object] | None = None   # native module factory; else the ONNX graph is converted
    dynamic_hw: bool = False           # height and width vary (detectors): input_shape is then the largest
    cpu_onnx_path: Path | None = None  # the same graph, faster on ONNX Runtime's CPU provider (export.prelu_as_convs)


class Engine(Protocol):
    backend: str
    device: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 NCHW batch -> the first output, float32, first axis the batch."""

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """float32 NCHW batch -> every output of the graph, in the graph's order."""


def engines_dir() -> Path:
    """Exported ONNX files and compiled engines: $CAFI_ENGINES_DIR, the checkout's engines/, or the user cache."""
    if os.environ.get("CAFI_ENGINES_DIR"):
        path = Path(os.environ["CAFI_ENGINES_DIR"])
    else:
        checkout = Path(__file__).resolve().parent.parent / "engines"
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cafi-stream" / "engines"
        path = checkout if (checkout / "README.md").is_file() else cache
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return device


def available_backends(device: str) -> list[str]:
    """Usable backends for `device`, fastest first."""
    if device == "cuda":
        out = []
        if importlib.util.find_spec("tensorrt") is not None:
            out.append("tensorrt")
        if _ort_has_cuda():
            out.append("ort")
        return out + ["torch"]
    return ["ort", "torch"]   # ONNX Runtime is about 2x torch for DBCNN on CPU (../shared/FACTS.md)


def choose_backend(requested: str, device: str) -> str:
    options = available_backends(device)
    if requested == "auto":
        return options[0]
    if requested not in BACKENDS:
        raise InputError(f"--backend {requested}: choose auto, {', '.join(BACKENDS)}")
    if requested not in options:
        why = {"tensorrt": "needs an NVIDIA GPU and `pip install .[gpu]`",
               "ort": "on a GPU needs onnxruntime-gpu (`pip install .[gpu]`)"}.get(requested, "")
        raise InputError(f"--backend {requested} is not available on {device} ({why}); available: "
                         f"{', '.join(options)}")
    return requested


def create_engine(source: ModelSource, backend: str = "auto", device: str = "cpu", max_batch: int = 32,
                  fp16: bool = True) -> Engine:
    name = choose_backend(backend, device)
    if name == "tensorrt":
        from .backend_trt import TensorRTEngine

        return TensorRTEngine(source, max_batch=max_batch, fp16=fp16)
    if name == "ort":
        from .backend_ort import OrtEngine

        return OrtEngine(source, device=device)
    from .backend_torch import TorchEngine

    return TorchEngine(source, device=device, fp16=fp16)


def nchw(images: np.ndarray, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """(N, H, W, C) uint8 images -> the networks' (N, C, H, W) float32 input, (pixel - mean) / std. The layout is
    changed while converting to float, in one pass: transposing the float array afterwards cost ~10x as much."""
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32)
    x -= mean
    x /= std
    return x


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, max_batch: int) -> np.ndarray:
    """Apply `fn` in slices of at most `max_batch` along the first axis."""
    if len(x) <= max_batch:
        return fn(x)
    return np.concatenate([fn(x[i:i + max_batch]) for i in range(0, len(x), max_batch)])
