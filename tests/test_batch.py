"""Batch runs: resume after a real kill, config changes, identities across videos, imagefolder / Parquet export,
the contact sheet in headless Chromium, and Ray against the local result."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import FACES, FR_MODEL, ROOT, SHARED, VIDEO, looped_copy, run_cli, still_video

ARGS = ["--topk", 3, "--iqa", "none", "--fr-model", FR_MODEL, "--min-face", 40]
TIMING = {"seconds", "fps", "out_dir", "finished"}


def batch_cli(out, *inputs, extra=()):
    proc = run_cli("batch", *inputs, "--out", out, *ARGS, *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def rows(out: Path, name="metadata.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "videos").rglob("*"))
            if p.suffix in (".jpg", ".png")}


def without_timing(d):
    if isinstance(d, dict):
        return {k: without_timing(v) for k, v in d.items() if k not in TIMING}
    if isinstance(d, list):
        return [without_timing(v) for v in d]
    return d


def assert_same_output(a: Path, b: Path) -> None:
    """Equal rows, image bytes and per-video summaries (apart from timing fields)."""
    assert rows(a) == rows(b)
    assert files(a) == files(b)
    for s in sorted((a / "videos").glob("*/summary.json")):
        other = b / s.relative_to(a)
        assert without_timing(json.loads(s.read_text())) == without_timing(json.loads(other.read_text()))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    loop = looped_copy(VIDEO, d / "hamilton_looped.mp4", 3)
    return [VIDEO, SHARED / "videos" / "video_chunk_6s.mp4", loop]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """An uninterrupted run, on a local pool of 2 processes."""
    out = tmp_path_factory.mktemp("reference")
    result = batch_cli(out, *inputs, extra=("--workers", 2, "--export", "parquet"))
    assert result["done"] == 3
    return out


def test_killed_batch_resumes_to_the_uninterrupted_result(inputs, reference, tmp_path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "cafi_stream.cli", "batch", *map(str, inputs), "--out", str(out), *map(str, ARGS)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 300
    # Kill once the first two videos are committed and the long looped one is part-way.
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) == 2 and \
                any((out / ".work").glob("hamilton_looped-*/faces/*.jpg")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the batch ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done_before = rows(out, "manifest.jsonl")
    assert [r["source"] for r in done_before] == [str(p) for p in inputs[:2]]
    assert not list((out / "videos").glob("hamilton_looped-*"))

    result = batch_cli(out, *inputs)
    assert (result["done"], result["skipped"], result["failed"]) == (1, 2, 0)
    assert not (out / ".work").exists()
    meta = rows(out)
    assert sorted({r["source"] for r in meta}) == sorted(str(p) for p in inputs)   # every video once
    assert len({(r["video"], r["track_id"], r["frame_index"]) for r in meta}) == len(meta)
    assert len({r["file_name"] for r in meta}) == len(meta)
    assert sorted(Counter(r["key"] for r in rows(out, "manifest.jsonl")).values()) == [1, 1, 1]
    # No file that no row names (a killed video's leftovers, or a previous config's).
    named = {r[c] for r in meta for c in ("file_name", "aligned_file", "masked_file")}
    assert set(files(out)) == named
    assert_same_output(out, reference)


def test_config_changes_rerun_what_they_affect(inputs, reference, tmp_path):
    out = tmp_path / "ds"
    batch_cli(out, *inputs[:2])
    # Identity settings only change the merge: nothing is re-run.
    result = batch_cli(out, *inputs[:2], extra=("--identity-threshold", 0.9))
    assert (result["done"], result["skipped"]) == (0, 2)
    # The number of faces per track changes every video's output.
    result = batch_cli(out, *inputs[:2], extra=("--topk", 1))
    assert (result["done"], result["skipped"]) == (2, 0)
    meta = rows(out)
    assert max(Counter((r["video"], r["track_id"]) for r in meta).values()) == 1
    named = {r[c] for r in meta for c in ("file_name", "aligned_file", "masked_file")}
    assert set(files(out)) == named


def test_inputs_expand_from_folders_globs_and_lists(tmp_path):
    from cafi_stream.batch import expand_inputs

    videos = SHARED / "videos"
    (tmp_path / "sub").mkdir()
    listing = tmp_path / "sub" / "list.txt"
    listing.write_text(f"# two videos, one relative to this list\n{VIDEO}\n\n../clip.mp4\nrtsp://cam.local/stream\n")
    (tmp_path / "clip.mp4").write_bytes(b"")
    got = expand_inputs([str(videos), str(videos / "*.mp4"), str(listing)])
    assert got == [str(VIDEO), str(videos / "video_chunk_6s.mp4"), str(tmp_path / "clip.mp4"),
                   "rtsp://cam.local/stream"]


def test_a_changed_source_is_redone(tmp_path):
    video = tmp_path / "chunk.mp4"
    video.write_bytes((SHARED / "videos" / "video_chunk_6s.mp4").read_bytes())
    out = tmp_path / "ds"
    assert batch_cli(out, VIDEO, video)["done"] == 2
    os.utime(video, ns=(time.time_ns(), time.time_ns() + 10**9))   # touched: size and head unchanged
    result = batch_cli(out, VIDEO, video)
    assert (result["done"], result["skipped"]) == (1, 1)
    assert len(rows(out, "manifest.jsonl")) == 2


def test_identities_across_tracks_and_videos(tmp_path):
    """The performer's wide shot and close-up (two tracks across shot changes) and a photo of him are one
    identity; photos of other people are other identities; two photos of Obama are one."""
    photos = ["lin_manuel_miranda__lin-manuel-miranda.png", "obama__test_obama1.jpg", "obama__train_obama_obama2.jpg",
              "biden__biden.jpg", "kit_harington__train_kit_harington_john1.jpeg",
              "rose_leslie__train_rose_leslie_img1.jpg"]
    videos = [still_video(FACES / p, tmp_path / f"{p.split('__')[0]}_{i}.mp4") for i, p in enumerate(photos)]
    out = tmp_path / "ds"
    result = batch_cli(out, VIDEO, *videos)
    meta = rows(out)
    identity, first_frame = {}, {}
    for r in meta:
        key = (r["video"].rsplit("-", 1)[0], r["track_id"])
        identity.setdefault(key, set()).add(r["identity_id"])
        first_frame[key] = min(first_frame.get(key, 10**9), r["frame_index"])
    assert all(len(ids) == 1 for ids in identity.values())
    identity = {k: ids.pop() for k, ids in identity.items()}
    # The performer fills the clip up to frame ~215 (a wide shot, then a close-up from frame ~100); the audience
    # shots after it may add other people.
    performer = {i for k, i in identity.items() if k[0] == "short_hamilton_clip" and first_frame[k] < 205}
    assert len([k for k in identity if k[0] == "short_hamilton_clip" and first_frame[k] < 205]) >= 2   # wide, close
    assert performer == {identity[("lin_manuel_miranda_0", 1)]}
    assert identity[("obama_1", 1)] == identity[("obama_2", 1)]
    others = [identity[(name, 1)] for name in ("biden_3", "kit_harington_4", "rose_leslie_5")]
    audience = {i for k, i in identity.items() if k[0] == "short_hamilton_clip"} - performer
    assert len(set(others) | {identity[("obama_1", 1)]} | performer) == 5
    assert not audience & (set(others) | performer)
    assert result["identities"] == 5 + len(audience)

    # --per identity: at most k faces per identity, chosen across its tracks and videos.
    assert Counter(r["identity_id"] for r in meta)[next(iter(performer))] > 3
    result = batch_cli(out, VIDEO, *videos, extra=("--per", "identity"))
    assert result["done"] == 0   # a merge-level setting: no video is re-run
    per = Counter(r["identity_id"] for r in rows(out))
    assert len(per) == 5 + len(audience) and max(per.values()) <= 3
    assert per[next(iter(performer))] == 3


def test_diversity_rules_on_kept_faces(tmp_path):
    out = tmp_path / "div"
    proc = run_cli(VIDEO, "--topk", 5, "--iqa", "none", "--fr-model", FR_MODEL, "--min-gap", 0.3,
                   "--max-similarity", 0.65, "--pose-bins", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    meta = rows(out)
    by_track = {}
    for r in meta:
        by_track.setdefault(r["track_id"], []).append(r)
    assert any(len(v) >= 2 for v in by_track.values())
    for kept in by_track.values():
        emb = np.array([r["embedding"] for r in kept])
        sim = emb @ emb.T
        for i, a in enumerate(kept):
            for j, b in enumerate(kept):
                if i != j:
                    assert abs(a["pts_time"] - b["pts_time"]) >= 0.3
                    assert sim[i, j] <= 0.65 + 1e-4
            if len(kept) > 1:
                assert a["similarity"] == pytest.approx(max(sim[i, k] for k in range(len(kept)) if k != i), abs=1e-3)
            assert a["pose"] in ("frontal", "left", "right")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["diversity"] == {"max_similarity": 0.65, "pose_bins": True, "frontal_yaw": 0.15}
    # Without the similarity rule the same track keeps near-duplicates: the rule is what removed them.
    plain = tmp_path / "plain"
    assert run_cli(VIDEO, "--topk", 5, "--iqa", "none", "--fr-model", FR_MODEL, "--min-gap", 0.3, "--out", plain,
                   "--quiet").returncode == 0
    assert max(r["similarity"] or 0 for r in rows(plain)) > 0.65


def test_imagefolder_and_parquet_load_every_column(reference, tmp_path):
    import datasets

    datasets.disable_progress_bars()
    meta = rows(reference)
    columns = set(meta[0]) - {"file_name"}
    ds = datasets.load_dataset("imagefolder", data_dir=str(reference), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(meta)
    assert columns <= set(ds.column_names) and "image" in ds.column_names
    assert sorted(ds["frame_index"]) == sorted(r["frame_index"] for r in meta)
    assert ds[0]["image"].size[0] > 0
    pq = datasets.load_dataset("parquet", data_files=str(reference / "dataset.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(pq) == len(meta) and columns <= set(pq.column_names)
    assert isinstance(pq.features["image"], datasets.Image) and pq[0]["image"].size[0] > 0


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                    reason=f"headless Chromium not found ({CHROMIUM}, {CHROMEDRIVER}: Debian's chromium and "
                           "chromium-driver; .ci/run installs them)")
def test_report_renders_every_face_in_headless_chromium(reference, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get((reference / "report.html").as_uri())   # returns after the load event: images are done
        images = driver.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        text = driver.find_element("tag name", "body").text
    finally:
        driver.quit()
    meta = rows(reference)
    assert sorted(src for src, _, _ in images) == sorted(r["file_name"] for r in meta)
    assert all(complete and width > 0 for _, complete, width in images), images
    for r in meta:
        assert f"identity {r['identity_id']}" in text
    import cv2

    png = cv2.imread(str(shot))
    assert png is not None and png.std() > 10   # not a blank page


def test_ray_batch_equals_local(inputs, reference, tmp_path):
    ray = pytest.importorskip("ray")
    from cafi_stream.batch import run_batch
    from cafi_stream.config import load_config

    cfg = load_config(None, {"output": {"topk": 3}, "iqa": {"name": "none"}, "fr": {"model": str(FR_MODEL)},
                             "faces": {"min_face": 40}})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_batch([str(p) for p in inputs], cfg, tmp_path / "ray", ray=True)
    finally:
        ray.shutdown()
    assert len(result.done) == 3 and not result.failed
    assert_same_output(tmp_path / "ray", reference)
