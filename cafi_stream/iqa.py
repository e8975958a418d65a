"""Stage 6: image-quality score of the masked face: pyiqa's DBCNN (default) or any pyiqa no-reference metric."""

from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, ModelError
from .models import DBCNN_CHECKPOINTS, pyiqa_cache_dir, resolve

log = logging.getLogger(__name__)


@dataclass
class IqaModel:
    """Scores (N, H, W, 3) uint8 RGB images. `lower_better` gives the metric's direction (PIQE: lower is better)."""

    name: str
    lower_better: bool
    net: object            # a torch module taking RGB float NCHW in [0, 1]
    device: str
    batch: int = 8
    weights: Path | None = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch])).to(self.device)
                x = x.permute(0, 3, 1, 2).float().div_(255.0)
                out.append(self.net(x).reshape(-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def oriented(self, value: float) -> float:
        """The score with higher meaning better, whatever the metric's direction."""
        return -value if self.lower_better else value


@contextlib.contextmanager
def _no_pretrained_downloads():
    """pyiqa's DBCNN fetches ImageNet VGG-16 and its SCNN weights in __init__ even with pretrained=False; the full
    checkpoint holds both, so construction must fetch nothing. Swap those two calls out while building."""
    from pyiqa.archs import dbcnn_arch
    import torchvision

    saved = dbcnn_arch.torchvision, dbcnn_arch.load_pretrained_network
    dbcnn_arch.torchvision = types.SimpleNamespace(
        models=types.SimpleNamespace(vgg16=lambda weights=None, **kw: torchvision.models.vgg16(weights=None, **kw)))
    dbcnn_arch.load_pretrained_network = lambda *a, **kw: None
    try:
        yield dbcnn_arch.DBCNN
    finally:
        dbcnn_arch.torchvision, dbcnn_arch.load_pretrained_network = saved


def build_dbcnn():
    """pyiqa's DBCNN architecture with random weights, built without any download."""
    with _no_pretrained_downloads() as dbcnn:
        return dbcnn(pretrained=False).eval()


def load_dbcnn_checkpoint(net, path: Path) -> None:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle / zip errors: a damaged or foreign file
        raise ModelError(f"{path}: not a readable DBCNN checkpoint ({e})") from None
    if isinstance(state, dict) and "params" in state:   # pyiqa's format
        state = state["params"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: does not match the DBCNN architecture ({str(e).splitlines()[0]})") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return device


def create_iqa(name: str, device: str, models_dir: Path, dbcnn_dataset: str = "koniq", batch: int = 8,
               weights: Path | None = None) -> IqaModel | None:
    """`name` is "none", "dbcnn" or a pyiqa no-reference metric. `weights` overrides DBCNN's checkpoint file."""
    if name == "none":
        return None
    if name == "dbcnn":
        if weights is None:
            if dbcnn_dataset not in DBCNN_CHECKPOINTS:
                raise InputError(f"unknown DBCNN checkpoint '{dbcnn_dataset}' ({', '.join(DBCNN_CHECKPOINTS)})")
            weights = resolve(DBCNN_CHECKPOINTS[dbcnn_dataset], models_dir, search=(pyiqa_cache_dir(),))
        net = build_dbcnn()
        load_dbcnn_checkpoint(net, weights)
        return IqaModel("dbcnn", lower_better=False, net=net.to(device), device=device, batch=batch,
                        weights=weights)
    import pyiqa

    if name not in pyiqa.list_models(metric_mode="NR"):
        hint = " (it is a full-reference metric)" if name in pyiqa.list_models() else ""
        raise InputError(f"--iqa {name}: not a pyiqa no-reference metric{hint}")
    try:
        metric = pyiqa.create_metric(name, device=device, as_loss=False)
    except Exception as e:   # pyiqa raises whatever its download or constructor raises
        raise ModelError(f"--iqa {name}: cannot build the metric ({str(e).splitlines()[0] if str(e) else e!r}); "
                         f"offline, only piqe and entropy build without a download") from None
    return IqaModel(name, lower_better=bool(metric.lower_better), net=metric, device=device, batch=batch)
