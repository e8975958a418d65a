"""Small runs of the evaluation harnesses: they must be able to fail, so they assert what SER-FIQ is known to do."""

import json
import subprocess
import sys

from conftest import ROOT


def run_script(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_selection_harness_serfiq_beats_random(tmp_path):
    run_script("scripts/eval_selection.py", "--out", tmp_path, "--segments", 3, "--seconds", 4,
               "--rankers", "random,serfiq")
    report = json.loads((tmp_path / "selection.json").read_text())
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    r = report["rankers"]
    assert truth["frames"] == 360 and {f["kind"] for f in truth["faces"]} >= {"clean", "noise", "gauss"}
    assert r["serfiq"]["kept_matched"] >= 6
    # random choice keeps, on average, the video's clean share (0.4); one small random run is too noisy to beat
    assert r["serfiq"]["clean_rate"] > 0.5
    assert r["serfiq"]["auc"] > 0.7 and abs(r["random"]["auc"] - 0.5) < 0.15
    assert (tmp_path / "selection.png").stat().st_size > 1000


def test_fiqa_harness_blur_correlates(tmp_path):
    run_script("scripts/eval_fiqa.py", "--out", tmp_path, "--quick")
    report = json.loads((tmp_path / "fiqa.json").read_text())
    assert report["spearman"]["gauss"] > 0
    edc = report["edc"]["serfiq"]
    assert edc[0][0] == 0 and edc[-1][1] <= edc[0][1]   # discarding low-quality pairs lowers FNMR
    assert (tmp_path / "fiqa.png").stat().st_size > 1000
