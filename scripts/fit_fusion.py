#!/usr/bin/env python3
"""Fit the learned fusion (cafi_stream/fusion.json) on the FIT clips only; prints the fit's own figures.

    scripts/fit_fusion.py [--work DIR] [--write]

Which people: eval_real.clips("fit"): the voxceleb2 clips at even positions in sorted order (7 clips of 6 people),
lia_vox_driving1, retalking_face1 and retalking_face2. scripts/eval_real.py reports on the other clips, whose
people are never seen here.

Data: eval_real's test video built from the fit clips with SEEDS (each seed draws other degradations for every
clip), run through the real pipeline with --exhaustive and --scores-out, so every face has every signal. Per
track the signals are standardised over the track, as the Selector does at the end of a track.

Model (cafi_stream/fusion.py): score = sum_i w_i * feature_i, w on the capped simplex (a floor <= w_i <= CAP for
SER-FIQ and IQA, 0 <= w_i <= CAP for the others, sum 1). The absolute signals' thresholds are the 5th percentile
of clean fit faces, their scales the clean faces' standard deviation. The weights are fitted by projected gradient
descent on the pairwise logistic loss of (clean, degraded) face pairs within a track, each (track, degradation
kind) weighing the same;
tau and SER-FIQ's floor are chosen by leave-one-person-out cross-validation within the fit clips (the best
worst-kind AUC). Two weight
sets are fitted: with the IQA signal, and without it (for --iqa none).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import eval_real  # noqa: E402
from cafi_stream.fusion import ABSOLUTE, NAMES, PARAMS, FusionModel, row_signals, standardise  # noqa: E402

SEEDS = (10, 11)
CAP = 0.3
TAUS = (0.5, 1.0, 2.0)
SERFIQ_FLOORS = (0.1,)   # SER-FIQ's least weight, chosen with tau (0.2 was worse for every tau); IQA's is IQA_FLOOR
IQA_FLOOR = 0.1
VERSION = "3"   # 3: fitted on the default front end (SCRFD keypoints and their ellipse mask)


def front_end() -> dict:
    """The detector and landmark source the fit's faces came through: signals depend on both."""
    from cafi_stream.config import load_config

    detect = load_config(overrides=eval_real.base_config()).detect
    return {"detector": detect.model, "landmarks": detect.landmarks}


def collect(work: Path) -> list[dict]:
    """Per fit track: raw signals (faces x signals), clean labels, identity."""
    from cafi_stream.config import load_config
    from cafi_stream.pipeline import Models

    work.mkdir(parents=True, exist_ok=True)
    models = None
    tracks = []
    for seed in SEEDS:
        video, truth_path = work / f"fit{seed}.mp4", work / f"fit{seed}.truth.json"
        scores = work / f"fit{seed}.scores.jsonl"
        if not scores.exists():
            truth = eval_real.build_video(eval_real.clips("fit"), video, seed)
            truth_path.write_text(json.dumps(truth))
            models = models or Models.load(load_config(overrides=eval_real.base_config()))
            eval_real.run_once(video, work, f"fit{seed}", eval_real.base_config(), models)
        truth = json.loads(truth_path.read_text())
        by_track = defaultdict(list)
        for line in scores.read_text().splitlines():
            r = json.loads(line)
            by_track[r["track_id"]].append(r)
        for rows in by_track.values():
            gt = [truth["frames"][r["frame_index"]] for r in rows]
            tracks.append({"x": np.stack([row_signals(r) for r in rows]),
                           "clean": np.array([g["kind"] == "clean" for g in gt]),
                           "kind": [g["kind"] for g in gt], "identity": gt[0]["identity"]})
    if models is not None:
        models.close()
    return tracks


def project(v: np.ndarray, lo: np.ndarray, cap: float) -> np.ndarray:
    """Euclidean projection onto {lo <= w <= cap, sum w = 1}: w = clip(v - theta, lo, cap), theta by bisection."""
    a, b = v.min() - cap - 1.0, v.max() + 1.0
    for _ in range(60):
        theta = (a + b) / 2
        if np.clip(v - theta, lo, cap).sum() > 1:
            a = theta
        else:
            b = theta
    return np.clip(v - b, lo, cap)


def model(tracks: list[dict], tau: float, serfiq_floor: float) -> FusionModel:
    """A model with the thresholds of these tracks' clean faces and no weights yet."""
    x = np.concatenate([t["x"] for t in tracks])[np.concatenate([t["clean"] for t in tracks])]
    th = np.where(ABSOLUTE[:, None], np.stack([np.nanpercentile(x, 5, axis=0), np.nanstd(x, axis=0)], 1), np.nan)
    return FusionModel(VERSION, np.zeros(len(NAMES)), tau, th, CAP, {"serfiq": serfiq_floor, "iqa": IQA_FLOOR})


def features(m: FusionModel, t: dict, use: np.ndarray) -> np.ndarray:
    return np.where(use, m.features(t["x"], standardise(t["x"])), 0.0)


def fit(tracks: list[dict], m: FusionModel, use: np.ndarray, steps: int = 400) -> FusionModel:
    diffs, weights = [], []
    for t in tracks:
        f = features(m, t, use)
        kinds = np.array(t["kind"])
        c = f[t["clean"]]
        for kind in set(kinds) - {"clean"}:   # every (track, kind) weighs the same: no kind is traded away
            d = f[kinds == kind]
            if len(c):
                diffs.append((c[:, None, :] - d[None, :, :]).reshape(-1, f.shape[1]))
                weights.append(np.full(len(diffs[-1]), 1.0 / len(diffs[-1])))
    d, pw = np.concatenate(diffs), np.concatenate(weights)
    pw /= pw.sum()
    lo = np.array([m.floor.get(n, 0.0) if use[i] else 0.0 for i, n in enumerate(NAMES)])
    cap = np.where(use, CAP, 0.0)
    best = (np.inf, None)
    for alpha in (2.0, 4.0, 8.0):   # the logistic's scale; the weights themselves sum to 1
        w = project(np.zeros(len(NAMES)), lo, cap)
        for _ in range(steps):
            g = -(pw * alpha / (1 + np.exp(np.clip(alpha * (d @ w), -50, 50)))) @ d
            w = project(w - 0.05 * g / max(1e-12, np.abs(g).max()), lo, cap)
        loss = float(pw @ np.logaddexp(0, -alpha * (d @ w)))
        if loss < best[0]:
            best = (loss, w)
    return dataclasses.replace(m, weights=best[1])


def kind_auc(tracks: list[dict], m: FusionModel, use: np.ndarray) -> dict[str, float]:
    """Per degradation kind: P(a clean face outranks a degraded one of its track), pooled over the tracks."""
    wins: dict[str, list[float]] = defaultdict(list)
    for t in tracks:
        s = features(m, t, use) @ m.weights
        kinds = np.array(t["kind"])
        c = s[t["clean"]]
        for kind in set(kinds) - {"clean"}:
            d = s[kinds == kind]
            if len(c):
                wins[kind].append(float((c[:, None] > d[None]).mean() + 0.5 * (c[:, None] == d[None]).mean()))
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(wins.items())}


def choose(tracks: list[dict], use: np.ndarray) -> tuple[tuple[float, float], dict]:
    """(tau, SER-FIQ floor) with the best worst-kind AUC over people held out one at a time."""
    people = sorted({t["identity"] for t in tracks})
    cv = {}
    for tau in TAUS:
        for floor in SERFIQ_FLOORS:
            per_kind: dict[str, list[float]] = defaultdict(list)
            for p in people:
                train = [t for t in tracks if t["identity"] != p]
                for k, v in kind_auc([t for t in tracks if t["identity"] == p],
                                     fit(train, model(train, tau, floor), use), use).items():
                    per_kind[k].append(v)
            cv[f"tau {tau}, serfiq floor {floor}"] = ((tau, floor),
                                                      {k: round(float(np.mean(v)), 4) for k, v in per_kind.items()})
    best = max(cv.values(), key=lambda c: min(c[1].values()))[0]
    return best, {name: c[1] for name, c in cv.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/cafi_fit_fusion", help="scratch folder for the fit videos and runs")
    p.add_argument("--write", action="store_true", help=f"write {PARAMS.name}")
    args = p.parse_args(argv)
    tracks = collect(Path(args.work))
    every = np.ones(len(NAMES), bool)
    (tau, floor), cv = choose(tracks, every)
    m = model(tracks, tau, floor)
    out = {"version": VERSION, "cap": CAP, "floor": m.floor, "tau": tau,
           "thresholds": {n: [round(float(a), 4), round(float(b), 4)] for n, (a, b) in zip(NAMES, m.thresholds)
                          if np.isfinite(a)},
           "fitted_on": {"clips": [c.name for c in eval_real.clips("fit")], "seeds": list(SEEDS),
                         "front_end": front_end(),
                         "tracks": len(tracks), "faces": int(sum(len(t["x"]) for t in tracks))},
           "leave_one_person_out_auc": cv}
    for name, use in (("with_iqa", every), ("without_iqa", np.array([n != "iqa" for n in NAMES]))):
        fitted = fit(tracks, m, use)
        out[name] = {n: round(float(v), 4) for n, v, u in zip(NAMES, fitted.weights, use) if u}
        out[f"{name}_fit_auc_by_kind"] = kind_auc(tracks, fitted, use)
    text = json.dumps(out, indent=1)
    print(text)
    if args.write:
        PARAMS.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
