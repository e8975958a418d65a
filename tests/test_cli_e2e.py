"""The acceptance run on the real clip, through the real CLI."""

import json

import cv2
import numpy as np
import pytest

from conftest import FR_MODEL, VIDEO, read_rows, run_cli

REQUIRED = {"file_name", "aligned_file", "masked_file", "track_id", "rank", "frame_index", "pts_time", "bbox",
            "landmarks", "serfiq", "iqa", "score"}


def test_acceptance_run_writes_valid_metadata(hamilton_run):
    proc, out = hamilton_run
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out)
    assert rows, "no face kept"
    by_track = {}
    for row in rows:
        assert REQUIRED <= row.keys()
        # --iqa none: the learned fusion's weights without IQA rank SER-FIQ and the capture measures
        assert row["iqa"] is None and np.isfinite(row["score"]) and row["capture"]["detail"] > 0
        assert len(row["bbox"]) == 4 and np.array(row["landmarks"]).shape == (5, 2)
        for column in ("file_name", "aligned_file", "masked_file"):
            image = cv2.imread(str(out / row[column]))
            assert image is not None, row[column]
        assert cv2.imread(str(out / row["aligned_file"])).shape == (112, 112, 3)
        assert cv2.imread(str(out / row["masked_file"])).shape == (384, 384, 3)
        x1, y1, x2, y2 = row["bbox"]
        assert x2 - x1 >= 112   # --min-face
        by_track.setdefault(row["track_id"], []).append(row)
    for track in by_track.values():
        assert len(track) <= 3
        assert sorted(r["rank"] for r in track) == list(range(1, len(track) + 1))
        ranked = sorted(track, key=lambda r: r["rank"])
        assert [r["score"] for r in ranked] == sorted((r["score"] for r in track), reverse=True)
        times = sorted(r["pts_time"] for r in track)
        assert all(b - a >= 0.5 for a, b in zip(times, times[1:]))   # --min-gap default
    # The main performer (frames ~90-215) is followed as one person, not split into many tracks.
    performer = {r["track_id"] for r in rows if 90 <= r["frame_index"] <= 215}
    assert 1 <= len(performer) <= 2, performer
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 275
    # cascade.serfiq_window: about one sampled face in three (0.1 s apart, 0.3 s windows) gets SER-FIQ
    assert 0 < summary["faces"]["serfiq_calls"] < summary["faces"]["serfiq_skipped"]
    assert summary["faces_kept"] == len(rows)
    assert summary["models"]["face_recognition"]["sha256"].startswith("6ced4e0c")
    assert {"detect", "track", "serfiq", "decode"} <= summary["seconds"].keys()
    assert summary["config"]["output"]["topk"] == 3


def test_serfiq_is_repeatable(hamilton_run, tmp_path):
    _, first = hamilton_run
    proc = run_cli(VIDEO, "--topk", 3, "--iqa", "none", "--fr-model", FR_MODEL, "--out", tmp_path, "--quiet")
    assert proc.returncode == 0, proc.stderr
    a = {(r["track_id"], r["frame_index"]): r["serfiq"] for r in read_rows(first)}
    b = {(r["track_id"], r["frame_index"]): r["serfiq"] for r in read_rows(tmp_path)}
    assert a == b


def test_process_yields_the_tracks_the_acceptance_run_writes(hamilton_run):
    """The library's iterator: the same config as the acceptance command gives, track by track, the faces that
    `run()` (its consumer) wrote, as frozen records, nothing written."""
    import dataclasses

    from cafi_stream.config import load_config
    from cafi_stream.pipeline import process

    proc, out = hamilton_run
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(overrides={"output": {"topk": 3}, "iqa": {"name": "none"}, "fr": {"model": str(FR_MODEL)}})
    results = list(process(str(VIDEO), cfg))
    assert results and all(r.final for r in results)   # a file: no snapshots
    assert len({r.track_id for r in results}) == len(results)
    assert any(r.faces for r in results)
    for r in (r for r in results if r.faces):   # a real track may keep nothing (every face under the SER-FIQ rule)
        assert [k.rank for k in r.faces] == list(range(1, len(r.faces) + 1)) and len(r.faces) <= 3
        times = [k.face.pts_time for k in r.faces]
        assert r.span[0] <= min(times) and max(times) <= r.span[1]
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.faces[0].face.serfiq = 0.0
    written = {(row["track_id"], row["frame_index"]) for row in read_rows(out)}
    assert {(r.track_id, k.face.frame_index) for r in results for k in r.faces} == written
