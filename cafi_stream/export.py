"""ONNX graphs the engines are built from, cached in engines/ by content hash."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .backend import ModelSource, engines_dir
from .models import sha256_of
from .outdir import atomic_write

log = logging.getLogger(__name__)


def cut_backbone(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """The sub-graph that computes `tensor`, with `tensor` as its only output."""
    producer = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    keep, stack = set(), [tensor]
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(model.graph.node[i].input)
    nodes = [n for i, n in enumerate(model.graph.node) if i in keep]
    used = {name for n in nodes for name in n.input}
    graph = onnx.helper.make_graph(
        nodes, model.graph.name,
        [i for i in model.graph.input if i.name in used],
        [onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)],
        initializer=[t for t in model.graph.initializer if t.name in used])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def prelu_as_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each PRelu of one constant slope `a` per channel computed as relu(x) + c(relu(-x)), where c is a
    1x1 depthwise convolution by -a and -x one by -1: the same values bit for bit, since one of the two terms is
    always zero and each convolution is one multiplication. ONNX Runtime's CPU PRelu broadcasts its slope element by
    element and takes the tensor out of its blocked (NCHWc) layout and back; these stay in it. On a 2-core build
    machine MobileFaceNet's backbone ran 2.1x faster on one thread (13.9 -> 6.7 ms a face) with the same features;
    ArcFace R50's 1.07x, its features within 6e-6 (ONNX Runtime then runs its batch norms in the blocked layout too;
    with graph optimisations off they are the same)."""
    consts = {t.name: t for t in model.graph.initializer}
    nodes, added = [], []
    for node in model.graph.node:
        slope = consts.get(node.input[1]) if node.op_type == "PRelu" else None
        dims = tuple(slope.dims) if slope is not None else ()
        if len(dims) not in (3, 4) or dims[-2:] != (1, 1) or dims[-3] < 2 or int(np.prod(dims)) != dims[-3]:
            nodes.append(node)   # not one slope per channel of an NCHW tensor: left as it is
            continue
        a = numpy_helper.to_array(slope).reshape(-1, 1, 1, 1)
        x, y = node.input[0], node.output[0]
        added += [numpy_helper.from_array(-np.ones_like(a), f"{y}/minus_one"),
                  numpy_helper.from_array(-a, f"{y}/minus_slope")]
        dw = {"group": len(a), "kernel_shape": [1, 1]}
        nodes += [onnx.helper.make_node("Relu", [x], [f"{y}/pos"]),
                  onnx.helper.make_node("Conv", [x, f"{y}/minus_one"], [f"{y}/neg"], **dw),
                  onnx.helper.make_node("Relu", [f"{y}/neg"], [f"{y}/neg_part"]),
                  onnx.helper.make_node("Conv", [f"{y}/neg_part", f"{y}/minus_slope"], [f"{y}/scaled"], **dw),
                  onnx.helper.make_node("Add", [f"{y}/pos", f"{y}/scaled"], [y])]
    if not added:
        return model
    used = {name for n in nodes for name in n.input}
    graph = onnx.helper.make_graph(nodes, model.graph.name, list(model.graph.input), list(model.graph.output),
                                   initializer=[t for t in model.graph.initializer if t.name in used] + added)
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _input_chw(model: onnx.ModelProto, default: tuple[int, int, int]) -> tuple[int, int, int]:
    init = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in init)
    dims = [d.dim_value or None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        return default
    return tuple(d or fallback for d, fallback in zip(dims[1:], default))


def fr_backbone_source(model: onnx.ModelProto, model_sha256: str, cut: str) -> ModelSource:
    """The recognition network up to its embedding layer's input, as an ONNX file of its own; where it has PRelu
    layers, also a copy with them as convolutions for ONNX Runtime's CPU provider (on a GPU a PRelu is one
    element-wise pass, and the copy's extra layers were not timed there)."""
    path = engines_dir() / f"fr_{model_sha256[:16]}_backbone.onnx"
    cpu_path = path.with_name(f"{path.stem}_cpu.onnx")
    has_prelu = any(node.op_type == "PRelu" for node in model.graph.node)
    if not path.is_file() or (has_prelu and not cpu_path.is_file()):
        backbone = cut_backbone(model, cut)
        if not path.is_file():
            atomic_write(path, backbone.SerializeToString())
        faster = prelu_as_convs(backbone)
        if faster is not backbone:
            atomic_write(cpu_path, faster.SerializeToString())
    return ModelSource(name="fr_backbone", onnx_path=path, sha256=sha256_of(path),
                       input_shape=_input_chw(model, (3, 112, 112)),
                       cpu_onnx_path=cpu_path if cpu_path.is_file() else None)


def export_onnx(net, path: Path, input_shape: tuple[int, int, int]) -> None:
    """torch -> ONNX with the legacy exporter (dynamo=False, opset 17, dynamic batch). The dynamo exporter's
    optimiser drops DBCNN's +1e-8 before sqrt (../shared/FACTS.md); this one matches torch to 1e-8."""
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), torch.zeros(1, *input_shape), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    atomic_write(path, buf.getvalue())


def torch_source(name: str, net, weights_key: str, input_shape: tuple[int, int, int]) -> ModelSource:
    """A native torch network, exported once per weights (`weights_key`) for the ONNX-based backends."""
    path = engines_dir() / f"{name}_{weights_key[:16]}_{input_shape[1]}x{input_shape[2]}.onnx"
    if not path.is_file():
        log.info("exporting %s to %s", name, path)
        export_onnx(net, path, input_shape)
    return ModelSource(name=name, onnx_path=path, sha256=sha256_of(path), input_shape=input_shape,
                       torch_module=lambda: net)
