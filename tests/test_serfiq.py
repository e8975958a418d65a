"""SER-FIQ on the shared MobileFaceNet and the real face photos."""

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from scipy.stats import spearmanr

from conftest import FR_MODEL
from cafi_stream import degrade
from cafi_stream.models import FR_MODELS, ModelSpec
from cafi_stream.serfiq import SerFiq, dropout_masks, find_embedding_head


@pytest.fixture(scope="module")
def serfiq():
    return SerFiq(FR_MODEL, FR_MODELS["mobilefacenet_paddlex_128d"])


def full_model_embeddings(model_path, x):
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0].reshape(len(x), -1)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_finds_the_1x1_conv_head_and_reproduces_the_embedding(serfiq, aligned_photos):
    head = find_embedding_head(onnx.load(str(FR_MODEL)))
    assert head.weight.shape == (512, 128)
    assert head.cut == "batch_norm_48.tmp_2"
    faces = np.stack(list(aligned_photos.values()))
    ref = full_model_embeddings(FR_MODEL, serfiq.preprocess(faces))
    assert np.abs(serfiq(faces).embeddings - ref).max() < 1e-4


def test_gemm_batchnorm_head_is_folded(tmp_path):
    """ArcFace-style tail (Flatten -> Gemm -> BatchNorm1d), built with torch and exported to ONNX."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.PReLU(8), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 28 * 28, 16), torch.nn.BatchNorm1d(16)).eval()
    with torch.no_grad():
        net[4].running_mean.uniform_(-1, 1)
        net[4].running_var.uniform_(0.5, 2)
        net[4].weight.uniform_(0.5, 2)
    path = tmp_path / "arcface_like.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    head = find_embedding_head(onnx.load(str(path)))
    assert head.weight.shape == (8 * 28 * 28, 16)
    model = SerFiq(path, ModelSpec(name="toy", file_name=path.name))
    faces = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    ref = full_model_embeddings(path, model.preprocess(faces))
    assert np.abs(model(faces).embeddings - ref).max() < 1e-4


def test_prelu_layers_become_convolutions_with_the_same_features(serfiq, aligned_photos):
    """On ONNX Runtime's CPU provider the backbone computes each per-channel PRelu as ReLUs and depthwise
    convolutions (`export.prelu_as_convs`, faster there): on real faces, the same features bit for bit with ONNX
    Runtime's graph optimisations off. A slope that is not one per channel is left as a PRelu."""
    from onnx import helper, numpy_helper

    from cafi_stream.backend import engines_dir
    from cafi_stream.export import cut_backbone, prelu_as_convs

    def ops(model):
        return [n.op_type for n in model.graph.node]

    def run(model, x, optimised=True):
        opts = ort.SessionOptions()
        if not optimised:   # ONNX Runtime's own layout choices aside: the rewrite alone
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]

    cut = cut_backbone(onnx.load(str(FR_MODEL)), serfiq.head.cut)
    new = prelu_as_convs(cut)
    assert ops(cut).count("PRelu") == 33 and "PRelu" not in ops(new)
    # ONNX Runtime on CPU reads the rewritten copy; the GPU backends the cut graph
    assert serfiq.engine.path == engines_dir() / f"fr_{serfiq.spec.sha256[:16]}_backbone_cpu.onnx"
    assert "PRelu" not in ops(onnx.load(str(serfiq.engine.path)))
    assert ops(onnx.load(str(serfiq.engine.path.with_name(f"fr_{serfiq.spec.sha256[:16]}_backbone.onnx")))) == ops(cut)
    x = serfiq.preprocess(np.stack(list(aligned_photos.values())))
    before = run(cut, x, optimised=False)
    assert (before < 0).any()   # the negative side is exercised
    assert np.array_equal(run(new, x, optimised=False), before)
    # Optimised, the same here; other CPUs' kernels may round the rest of the graph differently once in blocked layout
    assert np.abs(run(new, x) - run(cut, x)).max() <= 1e-5 * np.abs(before).max()

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("PRelu", ["x", "a"], ["h"]), helper.make_node("PRelu", ["h", "b"], ["y"])]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 5, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 5, 5])],
        [numpy_helper.from_array(rng.uniform(-0.5, 1.5, (4, 1, 1)).astype(np.float32), "a"),
         numpy_helper.from_array(np.array([0.25], np.float32), "b")])
    toy = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert ops(prelu_as_convs(toy)) == ["Relu", "Conv", "Relu", "Conv", "Add", "PRelu"]
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    assert np.array_equal(run(prelu_as_convs(toy), x, optimised=False), run(toy, x, optimised=False))


def test_the_head_shares_the_cores_only_when_it_is_large(serfiq, aligned_photos, tmp_path, monkeypatch):
    """MobileFaceNet's small head runs on one torch thread (split, it would wait for the decoder's core); a head
    of SPLIT_MACS or more on torch's pool, with the scores one thread gives. torch's thread count is kept."""
    import torch

    from cafi_stream import serfiq as module

    threads, real = [], module.serfiq_from_features

    def recorded(*args):
        threads.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(module, "serfiq_from_features", recorded)
    pool = torch.get_num_threads()
    faces = np.stack(list(aligned_photos.values()))
    serfiq(faces)
    assert threads == [1] and torch.get_num_threads() == pool

    torch.manual_seed(0)   # 100 passes x 6272 x 160 = 100.35 M multiply-adds a face
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 28 * 28, 160)).eval()
    path = tmp_path / "large_head.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    large = SerFiq(path, ModelSpec(name="toy", file_name=path.name))
    assert 100 * large.head.weight.size >= module.SPLIT_MACS and not large.one_thread
    threads.clear()
    pooled = large(faces).scores
    torch.set_num_threads(1)
    try:
        single = large(faces).scores
    finally:
        torch.set_num_threads(pool)
    assert threads == [pool, 1]
    assert np.abs(pooled - single).max() < 1e-6


def test_scores_are_repeatable_and_masks_seeded(serfiq, aligned_photos):
    faces = np.stack(list(aligned_photos.values()))
    assert np.array_equal(serfiq(faces).scores, serfiq(faces).scores)
    assert np.array_equal(serfiq(faces[:3]).scores, serfiq(faces).scores[:3])
    m = dropout_masks(100, 512, 0.5, seed=0)
    assert np.array_equal(m, dropout_masks(100, 512, 0.5, seed=0))
    assert set(np.unique(m)) == {0.0, 2.0} and abs((m > 0).mean() - 0.5) < 0.01


def test_same_person_pairs_are_more_similar(serfiq, aligned_photos):
    # One portrait at several resolutions counts as one photo: keep photos of distinct sources only.
    names = [n for n in aligned_photos if not any(t in n for t in ("obama-", "obama_small", "train_obama_obama"))]
    emb = dict(zip(names, serfiq(np.stack([aligned_photos[n] for n in names])).embeddings))
    same, diff = [], []
    for a, b in itertools.combinations(names, 2):
        sim = float(emb[a] @ emb[b])
        (same if a.split("__")[0] == b.split("__")[0] else diff).append(sim)
    assert len(same) >= 8 and len(diff) >= 50
    auc = np.mean([s > d for s in same for d in diff])
    print(f"\nsame-person cosine {np.mean(same):.3f} (n={len(same)}), different {np.mean(diff):.3f} "
          f"(n={len(diff)}), AUC {auc:.3f}")
    assert np.mean(same) > np.mean(diff) + 0.2
    assert auc >= 0.95


# The acceptance list's own parameters (112-pixel aligned faces).
DEGRADATIONS = {
    "gauss": [(s, lambda im, s=s: degrade.gaussian_blur(im, s)) for s in (2, 4, 8)],
    "noise": [(s, lambda im, s=s: degrade.noise(im, s)) for s in (10, 25, 50)],
    "downscale": [(f, lambda im, f=f: degrade.downscale(im, f)) for f in (4, 8)],
    "jpeg": [(q, lambda im, q=q: degrade.jpeg(im, q)) for q in (30, 10)],
    "motion": [(n, lambda im, n=n: degrade.motion_blur(im, n)) for n in (9, 15)],
}
ASSERTED = {("gauss", 4), ("gauss", 8), ("noise", 25), ("noise", 50), ("downscale", 8)}


def test_serfiq_ranks_clean_above_degraded(serfiq, aligned_photos):
    faces = np.stack(list(aligned_photos.values()))
    clean = serfiq(faces).scores
    report, failures = [], []
    for kind, levels in DEGRADATIONS.items():
        sev, delta = [], []
        for rank, (level, fn) in enumerate(levels, 1):
            scores = serfiq(np.stack([fn(f) for f in faces])).scores
            rate = float(np.mean(clean > scores))
            report.append(f"{kind:9s} {level:>3}: clean > degraded {rate:.2f}")
            sev += [0] * len(faces) + [rank] * len(faces)
            delta += list(clean) + list(scores)
            if (kind, level) in ASSERTED and rate < 0.9:
                failures.append((kind, level, rate))
        rho = spearmanr(sev, delta).statistic
        report.append(f"{kind:9s} Spearman(severity, score) {rho:+.2f}")
    print("\nSER-FIQ on {} aligned photos:\n".format(len(faces)) + "\n".join(report))
    assert not failures, failures


def test_typicality_follows_the_tracks_own_person(serfiq, aligned_photos):
    """fusion.Centroids on real photos: after a track of one person's photos, another photo of that person is more
    typical of the track than the same photo blurred, and far more than another person."""
    from cafi_stream.fusion import Centroids

    own = [n for n in aligned_photos if n.startswith("obama__") and "partial" not in n]
    other = next(n for n in aligned_photos if n.startswith("biden__"))
    track, probe = own[:-1], aligned_photos[own[-1]]
    emb = serfiq(np.stack([aligned_photos[n] for n in track]
                          + [probe, degrade.gaussian_blur(probe, 3), aligned_photos[other]])).embeddings

    def after_track(e):
        c = Centroids()
        assert c.typicality(7, emb[0]) is None   # a track's first face has nothing to be typical of
        for earlier in emb[1:len(track)]:
            c.typicality(7, earlier)
        return c.typicality(7, e)

    same, blurred, stranger = (after_track(e) for e in emb[len(track):])
    print(f"\ntypicality: another photo {same:.3f}, blurred {blurred:.3f}, another person {stranger:.3f}")
    assert same > blurred + 0.05 and blurred > stranger and same > stranger + 0.3
