"""Backends: parity between ONNX Runtime and torch on real faces, and TensorRT's device-independent parts."""

import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import FR_MODEL
from cafi_stream.backend import available_backends, choose_backend, create_engine
from cafi_stream.backend_trt import engine_key, profile_shapes
from cafi_stream.errors import InputError
from cafi_stream.export import fr_backbone_source, torch_source
from cafi_stream.iqa import build_dbcnn
from cafi_stream.models import FR_MODELS, sha256_of
from cafi_stream.serfiq import SerFiq, find_embedding_head


@pytest.fixture(scope="module")
def face_crops(aligned_photos):
    """Real faces at DBCNN's input size (the aligned photos scaled up to 384x384)."""
    import cv2

    return np.stack([cv2.resize(f, (384, 384), interpolation=cv2.INTER_CUBIC) for f in aligned_photos.values()])


def test_dbcnn_ort_matches_torch(face_crops, tmp_path, monkeypatch):
    """Random-init weights (the real ones are not available here): parity, not quality."""
    monkeypatch.setenv("CAFI_ENGINES_DIR", str(tmp_path))
    torch.manual_seed(0)
    net = build_dbcnn()
    source = torch_source("dbcnn", net, "paritytest", (3, 384, 384))
    x = face_crops[:8].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    ort_out = create_engine(source, "ort", "cpu")(x)
    torch_out = create_engine(source, "torch", "cpu")(x)
    assert ort_out.shape == (8, 1)
    np.testing.assert_allclose(ort_out, torch_out, rtol=1e-5, atol=1e-7)
    assert np.std(ort_out) > 0   # a constant output would make parity meaningless


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_backbone_and_head_reproduce_the_full_model(backend, aligned_photos, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setenv("CAFI_ENGINES_DIR", str(tmp_path))
    model = SerFiq(FR_MODEL, FR_MODELS["mobilefacenet_paddlex_128d"], backend=backend)
    assert model.engine.backend == backend
    faces = np.stack(list(aligned_photos.values()))
    full = ort.InferenceSession(str(FR_MODEL), providers=["CPUExecutionProvider"])
    ref = full.run(None, {"x": model.preprocess(faces)})[0]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(model(faces).embeddings - ref).max() < 1e-4


def test_backbone_cache_is_keyed_by_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFI_ENGINES_DIR", str(tmp_path))
    model = onnx.load(str(FR_MODEL))
    src = fr_backbone_source(model, sha256_of(FR_MODEL), find_embedding_head(model).cut)
    assert src.onnx_path.parent == tmp_path and sha256_of(FR_MODEL)[:16] in src.onnx_path.name
    assert src.input_shape == (3, 112, 112)
    again = fr_backbone_source(model, sha256_of(FR_MODEL), find_embedding_head(model).cut)
    assert again.sha256 == src.sha256


def test_tensorrt_profile_shapes():
    assert profile_shapes((3, 384, 384), 16) == ((1, 3, 384, 384), (8, 3, 384, 384), (16, 3, 384, 384))
    # A detector's frames keep their aspect: height and width range up to the largest input.
    assert profile_shapes((3, 640, 640), 8, dynamic_hw=True) == ((1, 3, 32, 32), (4, 3, 640, 640), (8, 3, 640, 640))
    assert (engine_key("ab" * 32, "H200", "10.3.0", "fp16", profile_shapes((3, 640, 640), 8, dynamic_hw=True))
            != engine_key("ab" * 32, "H200", "10.3.0", "fp16", profile_shapes((3, 640, 640), 8)))
    assert profile_shapes((3, 112, 112), 1) == ((1, 3, 112, 112),) * 3
    with pytest.raises(ValueError):
        profile_shapes((3, 112, 112), 0)


def test_tensorrt_cache_key_changes_with_everything_that_changes_the_engine():
    profile = profile_shapes((3, 384, 384), 16)
    base = engine_key("ab" * 32, "NVIDIA H100 80GB HBM3", "10.3.0", "fp16", profile)
    assert base.endswith(".plan") and "/" not in base and " " not in base
    variants = [
        engine_key("cd" * 32, "NVIDIA H100 80GB HBM3", "10.3.0", "fp16", profile),
        engine_key("ab" * 32, "NVIDIA A10G", "10.3.0", "fp16", profile),
        engine_key("ab" * 32, "NVIDIA H100 80GB HBM3", "10.4.0", "fp16", profile),
        engine_key("ab" * 32, "NVIDIA H100 80GB HBM3", "10.3.0", "fp32", profile),
        engine_key("ab" * 32, "NVIDIA H100 80GB HBM3", "10.3.0", "fp16", profile_shapes((3, 384, 384), 32)),
    ]
    assert len({base, *variants}) == 6
    assert base == engine_key("ab" * 32, "NVIDIA H100 80GB HBM3", "10.3.0", "fp16", profile)


def test_fallback_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # as if not installed
    import importlib.util

    assert importlib.util.find_spec("tensorrt") is None or "tensorrt" not in available_backends("cuda")
    assert choose_backend("auto", "cpu") == "ort"
    assert available_backends("cuda")[-1] == "torch"
    assert "tensorrt" not in available_backends("cuda")
    with pytest.raises(InputError, match="tensorrt"):
        choose_backend("tensorrt", "cuda")
    with pytest.raises(InputError, match="not available on cpu"):
        choose_backend("tensorrt", "cpu")
