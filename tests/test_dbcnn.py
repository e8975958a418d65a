"""DBCNN through pyiqa's architecture. Its real weights are not available here: these tests use a randomly
initialised network, so they check wiring and loading, never quality."""

import cv2
import numpy as np
import pytest
import torch

from conftest import FR_MODEL, VIDEO, read_rows, run_cli
from cafi_stream.iqa import build_dbcnn, create_iqa, load_dbcnn_checkpoint
from cafi_stream.models import DBCNN_CHECKPOINTS


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A randomly initialised DBCNN saved in pyiqa's checkpoint format, under the KonIQ file name."""
    torch.manual_seed(0)
    net = build_dbcnn()   # must not download anything (no network here)
    folder = tmp_path_factory.mktemp("models")
    path = folder / DBCNN_CHECKPOINTS["koniq"].file_name
    torch.save({"params": net.state_dict()}, path)
    return path


def test_checkpoint_round_trip(random_checkpoint):
    net = build_dbcnn()
    load_dbcnn_checkpoint(net, random_checkpoint)
    saved = torch.load(random_checkpoint, weights_only=True)["params"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved.items())


def test_cli_fills_iqa_from_models_dir(random_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(VIDEO, "--iqa", "dbcnn", "--models-dir", random_checkpoint.parent, "--fr-model", FR_MODEL,
                   "--max-frames", 100, "--topk", 2, "--fusion", "filter", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out)
    assert rows and all(isinstance(r["iqa"], float) and r["iqa_model"] == "dbcnn" for r in rows)
    # The score is DBCNN's output on the masked 384x384 crop that was written (PNG, so the same pixels).
    iqa = create_iqa("dbcnn", "cpu", random_checkpoint.parent)
    masked = np.stack([cv2.cvtColor(cv2.imread(str(out / r["masked_file"])), cv2.COLOR_BGR2RGB) for r in rows])
    assert masked.shape[1:] == (384, 384, 3)
    np.testing.assert_allclose(iqa(masked), [r["iqa"] for r in rows], rtol=1e-4, atol=1e-5)
    assert all(r["score"] == r["iqa"] for r in rows)   # the filter rule ranks by DBCNN, higher is better


def test_lower_better_metric_is_inverted(tmp_path):
    piqe = create_iqa("piqe", "cpu", tmp_path)
    assert piqe.lower_better and piqe.oriented(30.0) == -30.0
