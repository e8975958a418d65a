"""The GPU benchmark script's CPU path: what CI can run of it (no GPU there)."""

import json
import os
import subprocess
import sys

from conftest import ROOT, VIDEO


def test_gpu_bench_script_runs_the_whole_pipeline(tmp_path):
    """scripts/bench_gpu.sh run, as on the GPU machine, on a machine without one: the front end and the default
    configuration's cost and the front end detecting every frame, all at 1080p, each one JSON line."""
    env = dict(os.environ, PYTHON=sys.executable, CAFI_GPU_DIR=str(tmp_path / "carried"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh"), "run", str(VIDEO), "--max-frames", "60"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(runs) == 3, proc.stdout
    front, full, every = runs
    for run in runs:
        assert run["resolution"] == "1920x1080" and run["frames"] == 60
        assert run["decode_fps"] > 0 and run["e2e_fps"] > 0 and run["faces_kept"] > 0
        assert len(run["decode_fps_runs"]) == 2 and min(run["decode_fps_runs"]) > 0   # before and after the run
        assert run["device"] in ("cpu", "cuda") and (run["gpu"] is None) == (run["device"] == "cpu")
        assert run["backend"]["face_detector"] == "scrfd_2.5g"
        # detect.ahead = 0: a call per full-frame detection at 3 Hz; detect.batch (8) frames where every one is
        assert run["batch"]["detector"] == (8 if run["exhaustive"] else 1)
    assert front["iqa"] is None and front["serfiq_calls"] > 0
    assert every["exhaustive"] and every["iqa"] is None and every["serfiq_calls"] > front["serfiq_calls"]
    assert full["iqa"] == "dbcnn" and full["random_r50"] and full["random_dbcnn"] and full["iqa_calls"] > 0
