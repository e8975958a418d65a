#!/usr/bin/env python3
"""Fit the learned fusion (cafi_stream/fusion.json) on fit people only; prints the fit's own figures.

    scripts/fit_fusion.py [--work DIR] [--write]

Which people, in two data families that weigh the same in the loss:
- real video: eval_real.clips("fit"), the voxceleb2 clips at even positions in sorted order (7 clips of 6 people),
  lia_vox_driving1, retalking_face1 and retalking_face2. scripts/eval_real.py reports on the other clips;
- cards: eval_selection's synthetic degradations of the photos of the 25 people of ../shared/data/real/faces.
  scripts/eval_selection.py reports on the 6 people of ../shared/data/faces.
Neither evaluation's people are ever seen here.

Data: each family's test videos (real: eval_real's, one per seed in SEEDS, each drawing other degradations; cards:
eval_selection's, CARD_SEEDS), run through the real pipeline with --exhaustive and --scores-out, so every face has
every signal. Per track the signals are standardised over the track, as the Selector does at the end of a track.

Model (cafi_stream/fusion.py): score = sum_i w_i * feature_i, w on the capped simplex (a floor <= w_i <= CAP for
SER-FIQ and IQA, 0 <= w_i <= CAP for the others, sum 1). The absolute signals' thresholds are the 5th percentile
of clean fit faces, their scales the clean faces' standard deviation (a face is judged against the lower of its
threshold and its track's level less one scale). The weights are fitted by projected gradient
descent on the pairwise logistic loss of (clean, degraded) face pairs within a track, each (track, degradation
kind) weighing the same within its family; tau and SER-FIQ's floor are chosen by cross-validation over fit people
(FOLDS groups held out in turn: the best worst-kind AUC). Two weight sets are fitted: with the IQA signal, and
without it (for --iqa none).

Typicality's floor: the loss only asks whether a face is clean, and among clean faces a kept face should also be one
that looks like its person (a dataset is for recognition). Typicality gets the largest least weight of
TYPICALITY_FLOORS that costs the held-out fit people at most TYPICALITY_COST of AUC (worst kind, mean over kinds)
against none, with the tau chosen before; the rule was set before its cross-validation ran.
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
from cafi_stream.fusion import ABSOLUTE, NAMES, PARAMS, FusionModel, row_signals  # noqa: E402

SEEDS = (10, 11, 12, 13)   # 7: four draws of the fit clips' degradations (6: two)
# Cards (scripts/eval_selection.py's synthetic degradations of face photos) of the 25 people of
# ../shared/data/real/faces; eval_selection.py reports on the people of ../shared/data/faces, never seen here.
CARD_SEEDS = (20,)
CARD_SEGMENTS = 16
CARD_PHOTOS = eval_real.SHARED / "real" / "faces"
CAP = 0.3
TAUS = (0.5, 1.0, 2.0)
FOLDS = 5   # cross-validation folds of fit people
SERFIQ_FLOORS = (0.1,)   # SER-FIQ's least weight, chosen with tau (0.2 was worse for every tau); IQA's is IQA_FLOOR
IQA_FLOOR = 0.1
TYPICALITY_FLOORS = (0.05, 0.1, 0.15, 0.2)
TYPICALITY_COST = (0.01, 0.005)   # held-out AUC a typicality floor may cost: worst kind, mean over kinds
VERSION = "8"   # 8: typicality's floor (TYPICALITY_FLOORS); fine_detail (mild defocus in source pixels)
# 7: fitted on four draws of the fit videos (SEEDS) instead of two
# 6: typicality (cosine to the track's mean embedding); 7-bit int8 SCRFD front end
# 5: absolute signals judged against the track's own level too; int8 SCRFD front end
# 4: fitted on real video and cards of other people; phase-free blockiness; eye span


def front_end() -> dict:
    """The detector and landmark source the fit's faces came through: signals depend on both."""
    from cafi_stream.config import load_config

    detect = load_config(overrides=eval_real.base_config()).detect
    return {"detector": detect.model, "precision": detect.precision, "landmarks": detect.landmarks}


def _scored(work: Path, name: str, build, models: list) -> tuple[list[dict], dict]:
    """The scored rows and ground truth of fit video `name`, built and run through the real pipeline
    (`--exhaustive --scores-out`) once; later calls read them back."""
    from cafi_stream.config import load_config
    from cafi_stream.pipeline import Models

    scores, truth_path = work / f"{name}.scores.jsonl", work / f"{name}.truth.json"
    if not scores.exists():
        video, truth = build()
        truth_path.write_text(json.dumps(truth))
        if not models:
            models.append(Models.load(load_config(overrides=eval_real.base_config())))
        eval_real.run_once(video, work, name, eval_real.base_config(), models[0])
    return [json.loads(line) for line in scores.read_text().splitlines()], json.loads(truth_path.read_text())


def _track(rows: list[dict], gt: list[dict], family: str) -> dict:
    kinds = [g["kind"] if family == "real" or g["kind"] == "clean" else f"{family}:{g['kind']}" for g in gt]
    return {"x": np.stack([row_signals(r) for r in rows]), "clean": np.array([k == "clean" for k in kinds]),
            "kind": kinds, "identity": f"{family}:{gt[0]['identity']}", "family": family}


def collect(work: Path) -> list[dict]:
    """Per fit track: raw signals (faces x signals), clean labels, degradation kinds, identity and data family."""
    import eval_selection

    work.mkdir(parents=True, exist_ok=True)
    models: list = []
    tracks = []
    for seed in SEEDS:
        video = work / f"fit{seed}.mp4"
        rows, truth = _scored(work, f"fit{seed}",
                              lambda: (video, eval_real.build_video(eval_real.clips("fit"), video, seed)), models)
        by_track = defaultdict(list)
        for r in rows:
            by_track[r["track_id"]].append(r)
        tracks += [_track(t, [truth["frames"][r["frame_index"]] for r in t], "real") for t in by_track.values()]
    for seed in CARD_SEEDS:
        rows, truth = _scored(work, f"cards{seed}", lambda: eval_selection.build_video(
            work, CARD_SEGMENTS, 5.0, seed, CARD_PHOTOS, f"cards{seed}"), models)
        index = eval_selection.truth_index(truth)
        by_track = defaultdict(list)
        for r in rows:
            gt = eval_selection.match(index, r["frame_index"], r["bbox"])
            if gt is not None:
                by_track[r["track_id"]].append((r, gt))
        tracks += [_track([r for r, _ in t], [g for _, g in t], "cards") for t in by_track.values() if len(t) > 1]
    for m in models:
        m.close()
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


def model(tracks: list[dict], tau: float, serfiq_floor: float, typicality_floor: float = 0.0) -> FusionModel:
    """A model with the thresholds of these tracks' clean faces and no weights yet."""
    x = np.concatenate([t["x"] for t in tracks])[np.concatenate([t["clean"] for t in tracks])]
    th = np.where(ABSOLUTE[:, None], np.stack([np.nanpercentile(x, 5, axis=0), np.nanstd(x, axis=0)], 1), np.nan)
    return FusionModel(VERSION, np.zeros(len(NAMES)), tau, th, CAP,
                       {"serfiq": serfiq_floor, "iqa": IQA_FLOOR, "typicality": typicality_floor})


def features(m: FusionModel, t: dict, use: np.ndarray) -> np.ndarray:
    return np.where(use, m.group_features(t["x"]), 0.0)


def fit(tracks: list[dict], m: FusionModel, use: np.ndarray, steps: int = 400) -> FusionModel:
    diffs, weights = [], []
    families = {t["family"] for t in tracks}
    for t in tracks:
        f = features(m, t, use)
        kinds = np.array(t["kind"])
        c = f[t["clean"]]
        for kind in set(kinds) - {"clean"}:   # every (track, kind) weighs the same: no kind is traded away
            d = f[kinds == kind]
            if len(c):
                diffs.append((c[:, None, :] - d[None, :, :]).reshape(-1, f.shape[1]))
                weights.append((t["family"], np.full(len(diffs[-1]), 1.0 / len(diffs[-1]))))
    # Each data family (real video, cards) weighs the same, whatever its number of tracks and kinds.
    totals = defaultdict(float)
    for family, w in weights:
        totals[family] += w.sum()
    d = np.concatenate(diffs)
    pw = np.concatenate([w / (totals[family] * len(families)) for family, w in weights])
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


def held_out(tracks: list[dict], use: np.ndarray, *settings: float) -> dict[str, float]:
    """Per-kind AUC of a model(tracks, *settings) fitted without each of FOLDS groups of fit people in turn, on the
    group left out (mean over folds)."""
    people = sorted({t["identity"] for t in tracks})
    per_kind: dict[str, list[float]] = defaultdict(list)
    for fold in range(FOLDS):
        out = set(people[fold::FOLDS])
        train = [t for t in tracks if t["identity"] not in out]
        for k, v in kind_auc([t for t in tracks if t["identity"] in out],
                             fit(train, model(train, *settings), use), use).items():
            per_kind[k].append(v)
    return {k: round(float(np.mean(v)), 4) for k, v in per_kind.items()}


def choose(tracks: list[dict], use: np.ndarray) -> tuple[tuple[float, float, float], dict]:
    """(tau, SER-FIQ floor, typicality floor): the first two with the best worst-kind AUC over people held out,
    then typicality's floor by the rule of the module's docstring; and every setting's held-out AUCs."""
    cv = {f"tau {tau}, serfiq floor {floor}": ((tau, floor), held_out(tracks, use, tau, floor))
          for tau in TAUS for floor in SERFIQ_FLOORS}
    (tau, floor), base = max(cv.values(), key=lambda c: min(c[1].values()))
    chosen = 0.0
    for typical in TYPICALITY_FLOORS:
        auc = held_out(tracks, use, tau, floor, typical)
        cv[f"tau {tau}, serfiq floor {floor}, typicality floor {typical}"] = ((tau, floor), auc)
        if (min(auc.values()) >= min(base.values()) - TYPICALITY_COST[0]
                and np.mean(list(auc.values())) >= np.mean(list(base.values())) - TYPICALITY_COST[1]):
            chosen = typical
    return (tau, floor, chosen), {name: c[1] for name, c in cv.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/cafi_fit_fusion", help="scratch folder for the fit videos and runs")
    p.add_argument("--write", action="store_true", help=f"write {PARAMS.name}")
    args = p.parse_args(argv)
    tracks = collect(Path(args.work))
    every = np.ones(len(NAMES), bool)
    settings, cv = choose(tracks, every)
    m = model(tracks, *settings)
    out = {"version": VERSION, "cap": CAP, "floor": m.floor, "tau": m.tau,
           "thresholds": {n: [round(float(a), 4), round(float(b), 4)] for n, (a, b) in zip(NAMES, m.thresholds)
                          if np.isfinite(a)},
           "fitted_on": {"clips": [c.name for c in eval_real.clips("fit")], "seeds": list(SEEDS),
                         "cards": {"photos": "real/faces", "seeds": list(CARD_SEEDS), "shots": CARD_SEGMENTS},
                         "front_end": front_end(),
                         "tracks": len(tracks), "faces": int(sum(len(t["x"]) for t in tracks))},
           "held_out_people_auc": cv}
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
