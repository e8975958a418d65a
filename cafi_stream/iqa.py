"""Stage 6: image-quality score of the masked face: pyiqa's DBCNN (default) or any pyiqa no-reference metric."""

from __future__ import annotations

import contextlib
import io
import logging
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import Engine, ModelSource, create_engine, nchw, run_batched
from .backend_torch import TorchEngine
from .errors import InputError, ModelError
from .export import torch_source
from .models import DBCNN_CHECKPOINTS, pyiqa_cache_dir, resolve, sha256_of


log = logging.getLogger(__name__)


@dataclass
class IqaModel:
    """Scores (N, H, W, 3) uint8 RGB images. `lower_better` gives the metric's direction (PIQE: lower is better)."""

    name: str
    lower_better: bool
    engine: Engine         # takes RGB float NCHW in [0, 1]
    batch: int = 8
    weights: Path | None = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0, np.float32)
        return run_batched(self.engine, nchw(images, 0.0, 255.0), self.batch).reshape(len(images), -1)[:, 0]

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


@contextlib.contextmanager
def _chatter_to_log():
    """pyiqa prints its downloads; stdout belongs to the CLI's result line, so its lines go to the log instead."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            if line.strip():
                log.info("pyiqa: %s", line.strip())


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


def create_iqa(name: str, device: str, models_dir: Path, dbcnn_dataset: str = "koniq", batch: int = 8,
               backend: str = "auto", random_weights: bool = False, size: int = 384) -> IqaModel | None:
    """`name` is "none", "dbcnn" or a pyiqa no-reference metric. `random_weights` builds DBCNN with random
    weights (seed 0), for measuring its cost where the real checkpoint is not available; never for quality."""
    if name == "none":
        return None
    if name == "dbcnn":
        if random_weights:
            import torch

            torch.manual_seed(0)
            net, weights, key = build_dbcnn(), None, "random0"
        else:
            if dbcnn_dataset not in DBCNN_CHECKPOINTS:
                raise InputError(f"unknown DBCNN checkpoint '{dbcnn_dataset}' ({', '.join(DBCNN_CHECKPOINTS)})")
            weights = resolve(DBCNN_CHECKPOINTS[dbcnn_dataset], models_dir, search=(pyiqa_cache_dir(),))
            net = build_dbcnn()
            load_dbcnn_checkpoint(net, weights)
            key = sha256_of(weights)
        source = torch_source("dbcnn", net, key, (3, size, size))
        model = IqaModel("dbcnn", lower_better=False, engine=create_engine(source, backend, device, batch),
                         batch=batch, weights=weights)
        model(np.zeros((1, size, size, 3), np.uint8))   # first-run costs at start-up
        return model
    import pyiqa

    if name not in pyiqa.list_models(metric_mode="NR"):
        hint = " (it is a full-reference metric)" if name in pyiqa.list_models() else ""
        raise InputError(f"--iqa {name}: not a pyiqa no-reference metric{hint}")
    try:
        with _chatter_to_log():
            metric = pyiqa.create_metric(name, device=device, as_loss=False)
    except Exception as e:   # pyiqa raises whatever its download or constructor raises
        raise ModelError(f"--iqa {name}: cannot build the metric ({str(e).splitlines()[0] if str(e) else e!r}); "
                         f"offline, only piqe and entropy build without a download") from None
    # pyiqa metrics run as they are, in torch (many are not exportable to ONNX).
    source = ModelSource(name=name, onnx_path=None, sha256="", input_shape=(3, size, size),
                         torch_module=lambda: metric)
    return IqaModel(name, lower_better=bool(metric.lower_better), engine=TorchEngine(source, device, fp16=False),
                    batch=batch)
