"""ONNX Runtime backend: TensorRT / CUDA execution providers with onnxruntime-gpu, the CPU provider otherwise."""

from __future__ import annotations

import os

import numpy as np

from .backend import ModelSource, engines_dir


class OrtEngine:
    backend = "ort"

    def __init__(self, source: ModelSource, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = True
        opts.enable_mem_pattern = True
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if device == "cuda":
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available] + providers
            if "TensorrtExecutionProvider" in available:
                cache = str(engines_dir() / "ort_trt")
                providers.insert(0, ("TensorrtExecutionProvider", {
                    "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}))
        self.path = source.cpu_onnx_path if device != "cuda" and source.cpu_onnx_path else source.onnx_path
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] != "CPUExecutionProvider" else "cpu"
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]
