"""TensorRT backend: build (or load) a serialized engine from the ONNX file and run it on a CUDA stream.

Engines are cached in engines/ under a key of everything that makes one engine differ from another: the model's
sha256, the GPU, the TensorRT version, the precision and the batch profile. A timing cache shared by all builds
on one GPU makes rebuilds fast. Device buffers are torch CUDA tensors, so no other CUDA binding is needed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from .backend import ModelSource, engines_dir
from .outdir import atomic_write

log = logging.getLogger(__name__)


def profile_shapes(input_shape: tuple[int, int, int], max_batch: int,
                   dynamic_hw: bool = False) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) input shapes of the optimisation profile: batch 1 .. max_batch, tuned for half of max.
    A detector's height and width may be anything from 32 up to `input_shape`'s."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    opt = max(1, max_batch // 2)
    low = (input_shape[0], 32, 32) if dynamic_hw else input_shape
    return (1, *low), (opt, *input_shape), (max_batch, *input_shape)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def engine_key(model_sha256: str, gpu_name: str, trt_version: str, precision: str, profile) -> str:
    """A file name that changes whenever the engine would: model, GPU, TensorRT, precision, profile."""
    batches = "-".join(str(shape[0]) for shape in profile)
    size = "x".join(str(d) for d in profile[-1][1:]) + ("_dynhw" if profile[0][2:] != profile[-1][2:] else "")
    return (f"{model_sha256[:16]}_{_slug(gpu_name)}_trt{_slug(trt_version)}_{precision}_b{batches}_{size}.plan")


def timing_cache_path(gpu_name: str, trt_version: str) -> Path:
    return engines_dir() / f"timing_{_slug(gpu_name)}_trt{_slug(trt_version)}.cache"


def build_engine(source: ModelSource, max_batch: int, fp16: bool, gpu_name: str) -> Path:
    """Compile `source` into a serialized engine in engines/ (or find the one already there)."""
    import tensorrt as trt

    profile = profile_shapes(source.input_shape, max_batch, source.dynamic_hw)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    precision = "fp16" if fp16 and builder.platform_has_fast_fp16 else "fp32"
    path = engines_dir() / f"{source.name}_{engine_key(source.sha256, gpu_name, trt.__version__, precision, profile)}"
    if path.is_file():
        return path
    log.warning("building a TensorRT engine for %s (%s, batch 1-%d); this happens once per GPU and model",
                source.name, precision, max_batch)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(source.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {source.onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(network.get_input(0).name, *profile)
    config.add_optimization_profile(opt_profile)
    cache_file = timing_cache_path(gpu_name, trt.__version__)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {source.onnx_path}")
    atomic_write(cache_file, bytes(config.get_timing_cache().serialize()))
    atomic_write(path, bytes(plan))
    return path


class TensorRTEngine:
    backend = "tensorrt"
    device = "cuda"

    def __init__(self, source: ModelSource, max_batch: int = 32, fp16: bool = True):
        import tensorrt as trt
        import torch

        self.torch = torch
        gpu = torch.cuda.get_device_name()
        plan = build_engine(source, max_batch, fp16, gpu)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot load TensorRT engine {plan}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.max_batch = max_batch
        self.stream = torch.cuda.Stream()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        torch = self.torch
        chunks = []
        for i in range(0, len(x), self.max_batch):
            chunk = x[i:i + self.max_batch]
            with torch.cuda.stream(self.stream):
                inp = torch.from_numpy(np.ascontiguousarray(chunk, np.float32)).pin_memory().to(
                    "cuda", non_blocking=True)
                self.context.set_input_shape(self.input, tuple(inp.shape))
                self.context.set_tensor_address(self.input, inp.data_ptr())
                outs = []
                for name in self.outputs:
                    out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32,
                                      device="cuda")
                    self.context.set_tensor_address(name, out.data_ptr())
                    outs.append(out)
                self.context.execute_async_v3(self.stream.cuda_stream)
                host = [out.to("cpu", non_blocking=True) for out in outs]
            self.stream.synchronize()
            chunks.append([h.numpy() for h in host])
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]
