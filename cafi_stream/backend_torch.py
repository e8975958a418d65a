"""torch backend: CUDA with fp16 autocast and channels_last when available, CPU otherwise."""

from __future__ import annotations

import numpy as np

from .backend import ModelSource


class TorchEngine:
    backend = "torch"

    def __init__(self, source: ModelSource, device: str = "cpu", fp16: bool = True):
        import torch

        if source.torch_module is not None:
            module = source.torch_module()
        else:   # graphs that exist only as ONNX (face-recognition backbones) are converted
            import onnx2torch

            module = onnx2torch.convert(str(source.onnx_path))
        self.device = device
        self.cuda = device == "cuda"
        self.fp16 = fp16 and self.cuda
        self.module = module.eval().to(device)
        if self.cuda:
            self.module = self.module.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True   # fixed input sizes: let cuDNN pick its fastest kernels

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
            t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device, non_blocking=True)
            if self.cuda:
                t = t.contiguous(memory_format=torch.channels_last)
            out = self.module(t)
            return [o.float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]
