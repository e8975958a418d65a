"""Stage 5: SER-FIQ (Terhörst et al., CVPR 2020) on an ONNX face-recognition model.

The model is split at the input of its final embedding layer. The backbone runs once per face (ONNX Runtime); the
layer itself is applied T times to dropout-masked copies of the features in one batched product. The masks come
from a fixed seed, so a face always gets the same score.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import CafiError, ModelError
from .backend import nchw, run_batched
from .models import ModelSpec, sha256_of

log = logging.getLogger(__name__)

# Ops between the embedding layer and the graph output that do not change values.
_PASSTHROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Cast"}


@dataclass(frozen=True)
class EmbeddingHead:
    """y = x @ weight + bias, with any trailing affine ops (BatchNorm, Mul/Add by constants) folded in."""

    cut: str              # tensor name of the layer's input, where the backbone ends
    weight: np.ndarray    # (D, E)
    bias: np.ndarray      # (E,)
    layer: str            # node name, for logs


@dataclass(frozen=True)
class SerFiqResult:
    scores: np.ndarray       # (N,) in (0, 1]; higher is more recognisable
    embeddings: np.ndarray   # (N, E) L2-normalised, the model's own embedding (no dropout)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    return consts


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_embedding_head(model: onnx.ModelProto) -> EmbeddingHead:
    """Walk back from the graph output to the final linear layer: a Gemm, a MatMul (+Add), or a 1x1 Conv."""
    graph = model.graph
    if not graph.node or not graph.output:
        raise ModelError("the model has no graph (an empty or foreign file?)")
    consts = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    post: list[tuple[np.ndarray, np.ndarray]] = []   # affine (scale, shift) ops after the layer, output side first
    tensor = graph.output[0].name

    def const_input(node):
        ins = [i for i in node.input if i in consts]
        var = [i for i in node.input if i not in consts]
        return (consts[ins[0]], var[0]) if len(ins) == 1 and len(var) == 1 else (None, None)

    for _ in range(64):
        node = producer.get(tensor)
        if node is None:
            break
        op = node.op_type
        if op in _PASSTHROUGH:
            tensor = node.input[0]
        elif op == "BatchNormalization" and all(i in consts for i in node.input[1:5]):
            gamma, beta, mean, var = (consts[i].astype(np.float64) for i in node.input[1:5])
            scale = gamma / np.sqrt(var + _attr(node, "epsilon", 1e-5))
            post.append((scale, beta - mean * scale))
            tensor = node.input[0]
        elif op in ("Gemm", "MatMul", "Add", "Conv") and (head := _linear(node, consts, producer)) is not None:
            cut, w, b = head
            if cut not in producer:   # nothing before the layer: SER-FIQ needs a backbone to cut off
                raise ModelError(f"the embedding layer {node.name or op} takes the model's input directly: "
                                 f"this is not a face-recognition network")
            for scale, shift in reversed(post):   # fold trailing affine ops, nearest the layer first
                w = w * scale[None, :]
                b = b * scale + shift
            return EmbeddingHead(cut=cut, weight=w.astype(np.float32),
                                 bias=np.broadcast_to(b, (w.shape[1],)).astype(np.float32), layer=node.name or op)
        elif op in ("Mul", "Add", "Sub") and (c := const_input(node))[0] is not None:
            value, var_in = c
            value = value.astype(np.float64).reshape(-1)
            if op == "Sub" and node.input[0] != var_in:   # c - x: not folded
                raise ModelError(f"unsupported op after the embedding layer: {node.name} ({op})")
            post.append((value, np.zeros_like(value)) if op == "Mul" else
                        (np.ones_like(value), value if op == "Add" else -value))
            tensor = var_in
        else:
            raise ModelError(f"cannot find the final embedding layer: reached {node.name} ({op}) from the output")
    raise ModelError("cannot find the final embedding layer in the model graph")


def _linear(node, consts, producer):
    """(input tensor, W (D, E), b (E,)) for a linear layer node, or None."""
    op = node.op_type
    if op == "Gemm" and node.input[1] in consts and not _attr(node, "transA", 0):
        w = consts[node.input[1]].astype(np.float64)
        w = w.T if _attr(node, "transB", 0) else w
        w = w * _attr(node, "alpha", 1.0)
        b = consts[node.input[2]].astype(np.float64) * _attr(node, "beta", 1.0) if len(node.input) > 2 and \
            node.input[2] else np.zeros(w.shape[1])
        return node.input[0], w, b.reshape(-1)
    if op == "MatMul" and node.input[1] in consts:
        w = consts[node.input[1]].astype(np.float64)
        return node.input[0], w, np.zeros(w.shape[1])
    if op == "Add":   # MatMul + bias
        for i, j in ((0, 1), (1, 0)):
            mm = producer.get(node.input[i])
            if mm is not None and mm.op_type == "MatMul" and node.input[j] in consts and mm.input[1] in consts:
                w = consts[mm.input[1]].astype(np.float64)
                return mm.input[0], w, consts[node.input[j]].astype(np.float64).reshape(-1)
        return None
    if op == "Conv" and node.input[1] in consts:
        w = consts[node.input[1]].astype(np.float64)
        if w.ndim != 4 or w.shape[2:] != (1, 1) or _attr(node, "group", 1) != 1:
            return None
        b = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else \
            np.zeros(w.shape[0])
        return node.input[0], w.reshape(w.shape[0], w.shape[1]).T, b
    return None


def dropout_masks(passes: int, dim: int, p: float, seed: int) -> np.ndarray:
    """(T, D) inverted-dropout masks: 0 with probability p, else 1/(1-p)."""
    rng = np.random.default_rng(seed)
    return ((rng.random((passes, dim)) >= p) / (1.0 - p)).astype(np.float32)


def serfiq_from_features(features, weight, bias, masks, chunk_bytes: int = 256 << 20):
    """SER-FIQ scores and plain embeddings for backbone features (N, D). All arguments are torch tensors on one
    device; the T passes of a face are one batched matmul."""
    import torch

    n, d = features.shape
    t = masks.shape[0]
    iu = torch.triu_indices(t, t, offset=1, device=features.device)
    step = max(1, chunk_bytes // (t * d * 4))
    scores = []
    for i in range(0, n, step):
        x = features[i:i + step]
        out = torch.matmul(x[:, None, :] * masks[None], weight) + bias          # (n, T, E)
        out = torch.nn.functional.normalize(out, dim=-1)
        gram = torch.matmul(out, out.transpose(1, 2))                           # (n, T, T)
        dist = torch.sqrt(torch.clamp(2.0 - 2.0 * gram[:, iu[0], iu[1]], min=0.0))
        scores.append(2.0 / (1.0 + torch.exp(dist.mean(dim=1))))
    emb = torch.nn.functional.normalize(torch.matmul(features, weight) + bias, dim=-1)
    return torch.cat(scores), emb


_TORCH_THREADS = threading.Lock()


# A face's head work (passes x the layer's multiply-adds) from which the head is shared over torch's CPU threads.
# Below it, split over torch's pool, the head waits for the core the decoder holds (MobileFaceNet's 512x128 head,
# 6.6 M: ~12 ms a call on 2 cores instead of ~0.6 ms); above it the second core wins (ArcFace R50's 25088x512,
# 1.3 G: 37 ms a face on one thread, 22.5 ms on two, the same scores bit for bit).
SPLIT_MACS = 100_000_000


@contextlib.contextmanager
def _one_thread(on: bool):
    """torch on one CPU thread while `on`."""
    import torch

    if not on:
        yield
        return
    with _TORCH_THREADS:   # torch's thread count is global: callers in other threads wait, never restore 1
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


class SerFiq:
    def __init__(self, model_path: Path, spec: ModelSpec, passes: int = 100, dropout: float = 0.5, seed: int = 0,
                 device: str = "cpu", batch: int = 32, channel_order: str = "", mean: float = -1, std: float = -1,
                 backend: str = "auto"):
        import torch

        from .backend import create_engine
        from .export import fr_backbone_source

        try:
            model = onnx.load(str(model_path))
        except Exception as e:   # onnx raises DecodeError, ValueError, ...: all mean "not an ONNX model"
            raise ModelError(f"{model_path}: not a readable ONNX model ({e})") from None
        try:
            self.head = find_embedding_head(model)
        except ModelError as e:
            raise ModelError(f"{model_path}: {e}") from None
        log.info("SER-FIQ: embedding layer %s (%d -> %d), backbone cut at %s", self.head.layer,
                 *self.head.weight.shape, self.head.cut)
        inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
        self.fixed_batch = dims[0] if dims and dims[0] else None
        source = fr_backbone_source(model, sha256_of(Path(model_path)), self.head.cut)
        self.size = source.input_shape[1:]
        try:
            self.engine = create_engine(source, backend, device, max_batch=self.fixed_batch or batch)
        except CafiError:
            raise
        except Exception as e:   # a backbone no backend accepts is not kept in the cache for later runs
            source.onnx_path.unlink(missing_ok=True)
            raise ModelError(f"{model_path}: its backbone does not load ({str(e).strip().splitlines()[-1]})") from None
        self.spec = spec
        self.channel_order = channel_order or spec.channel_order
        self.mean = mean if mean >= 0 else spec.mean
        self.std = std if std > 0 else spec.std
        self.batch = self.fixed_batch or batch
        self.device = torch.device(device)
        self.weight = torch.from_numpy(self.head.weight).to(self.device)
        self.bias = torch.from_numpy(self.head.bias).to(self.device)
        self.masks = torch.from_numpy(dropout_masks(passes, self.head.weight.shape[0], dropout, seed)).to(self.device)
        self.one_thread = self.device.type == "cpu" and passes * self.head.weight.size < SPLIT_MACS
        self(np.zeros((1, *self.size, 3), np.uint8))   # first-run costs (allocations, kernels) at start-up

    def preprocess(self, faces: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB aligned faces -> the model's NCHW float input."""
        return nchw(faces if self.channel_order == "RGB" else faces[..., ::-1], self.mean, self.std)

    def features(self, faces: np.ndarray) -> np.ndarray:
        """Backbone features (N, D) at the embedding layer's input."""
        feats = run_batched(self.engine, self.preprocess(faces), self.batch).reshape(len(faces), -1)
        if feats.shape[1] != self.head.weight.shape[0]:
            raise ModelError(f"backbone output has {feats.shape[1]} values per face but the embedding layer takes "
                             f"{self.head.weight.shape[0]}: the layer is not applied to a flat feature vector")
        return feats

    def __call__(self, faces: np.ndarray) -> SerFiqResult:
        import torch

        if len(faces) == 0:
            return SerFiqResult(np.zeros(0, np.float32), np.zeros((0, self.head.weight.shape[1]), np.float32))
        feats = torch.from_numpy(self.features(faces)).to(self.device)
        with torch.inference_mode(), _one_thread(self.one_thread):
            scores, emb = serfiq_from_features(feats, self.weight, self.bias, self.masks)
        return SerFiqResult(scores.float().cpu().numpy(), emb.float().cpu().numpy())
