#!/usr/bin/env python3
"""Does cafi-stream keep the right faces on real video? Real talking-head clips, degraded over the whole frame the way
a camera degrades it, with ground truth per frame; every ranker and every single signal in the same run.

    scripts/eval_real.py --out DIR [--readme README.md] [--quick]

The test video joins SECONDS one-second segments of each clip (a hard cut between clips). CLEAN of each clip's
segments are left as they are; each other segment gets one of degrade.CAMERA's kinds (defocus, camera shake at a
random angle, low light with shot noise and gain, sensor noise, JPEG starvation, low resolution, a hand-sized
occluder) at level 1-3, drawn so that every kind and level comes up about equally often.

People are split by clip (`clips`): the fusion was fitted (scripts/fit_fusion.py) on the `fit` clips only;
everything reported here is on the `report` clips, whose people appear in no fit clip.

Reported per ranker (real pipeline runs, `--exhaustive` so every face gets every score, except `cafi_cascade`) and per single signal (the
same run's --scores-out, ranked by that signal alone under the same top-k and min-gap rule), with random choice and
the oracle (clean faces first) in the same table:
- the clean share of the kept faces, per track and per identity;
- the within-person AUC per degradation kind (the chance that a clean face outranks a degraded one);
- false and missed shot cuts against the clip boundaries.
Plus a utility check on lia_vox_obama.mov: the mean cosine between the kept faces and the shared Obama photos
(ArcFace-family embeddings) against that of every scored face, and where it falls among random choices of as many
faces (`chance`). Writes DIR/real.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("CAFI_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The face detectors' files (SCRFD, YuNet) are read from the shared models, as a site's model store.
os.environ.setdefault("CAFI_MODEL_PATH", str(SHARED / "models" / "optional"))
# The test video's occluders sit on the faces this detector finds: fixed, so that the video stays the same
# whichever detector the pipeline runs with.
VIDEO_DETECTOR = "mediapipe"
VIDEOS = SHARED / "real" / "videos"

from cafi_stream import degrade  # noqa: E402
from cafi_stream.fusion import NAMES, row_signals  # noqa: E402
from cafi_stream.select import pick_diverse  # noqa: E402
from eval_cuts import split_clips  # noqa: E402
from readme_block import replace_block  # noqa: E402

SIZE, FPS = 288, 25
SECONDS, CLEAN = 8, 3        # segments per clip, clean ones among them (37.5% clean)
TOPK, MIN_GAP = 3, 1.0
# Clips that cannot be used: faces under min_face (TED), many people (street), a 2-second GIF; Obama is the
# utility check's own video.
UNUSED = ("lia_ted_", "street_", "elon_", "lia_vox_obama")
SAME_PERSON = {"voxceleb2_pose_source_741400163": "voxceleb2_audio_source_741400104"}   # README of shared/real
FR_MODEL = SHARED / "models" / "mobilefacenet_paddlex_128d.onnx"

RANKERS = {
    "cafi": {},   # the default configuration's ranking
    "cafi_cascade": {"cascade": {"exhaustive": False}},   # the same with the default cascade (IQA on a budget)
    "cafi_zmin": {"rank": {"fusion": "zmin"}},
    "cafi_filter": {"rank": {"fusion": "filter"}},
    "serfiq": {"rank": {"method": "serfiq"}},
    "sharpness": {"rank": {"method": "sharpness"}},
    "random": {"rank": {"method": "random"}},
}


# Sources other than voxceleb2 whose first clips are fit clips too, so that the fusion sees every source.
FIT_TOO = ("lia_vox_driving1", "retalking_face1", "retalking_face2")


def clips(split: str) -> list[Path]:
    """`fit`: eval_cuts' fit clips (the voxceleb2 clips at even positions) and FIT_TOO; `report`: every other
    usable clip. No person is in both."""
    usable = [c for group in split_clips().values() for c in group if not c.name.startswith(UNUSED)]
    fit = [c for c in usable if c in split_clips()["fit"] or c.stem in FIT_TOO]
    return sorted(fit if split == "fit" else [c for c in usable if c not in fit])


def identity(clip: Path) -> str:
    return SAME_PERSON.get(clip.stem, clip.stem)


def _frames(clip: Path, n: int):
    """`n` frames at FPS, SIZE x SIZE, from `clip` (centre square); a clip shorter than n/FPS plays on backwards."""
    with av.open(str(clip)) as c:
        stream = c.streams.video[0]
        src = [(float(f.time or 0.0), f.to_ndarray(format="rgb24")) for f in c.decode(stream)]
    times = np.array([t for t, _ in src])
    duration = times[-1] if len(times) > 1 else 1.0
    for i in range(n):
        t = i / FPS
        t = t % (2 * duration)
        t = 2 * duration - t if t > duration else t   # ping-pong: still the person's real motion
        img = src[int(np.argmin(np.abs(times - t)))][1]
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        yield cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA if s > SIZE else cv2.INTER_LINEAR)


def plan(n_clips: int, rng: np.random.Generator) -> list[list[tuple[str, int]]]:
    """Per clip, SECONDS (kind, level) segments: CLEAN clean ones at random places, the rest from a shuffled deck
    of every (kind, level) so that kinds and levels are balanced over the video."""
    deck: list[tuple[str, int]] = []
    out = []
    for _ in range(n_clips):
        segs: list[tuple[str, int]] = []
        for _ in range(SECONDS - CLEAN):
            if not deck:
                deck = [(k, lv) for k in degrade.CAMERA_KINDS for lv in (1, 2, 3)]
                rng.shuffle(deck)
            segs.append(deck.pop())
        for pos in sorted(rng.choice(SECONDS, CLEAN, replace=False)):
            segs.insert(int(pos), ("clean", 0))
        out.append(segs)
    return out


def build_video(clip_list: list[Path], path: Path, seed: int = 0) -> dict:
    """Writes the test video and returns its ground truth: per frame the clip, identity, kind and level."""
    from cafi_stream.analyse import FaceAnalysis

    rng = np.random.default_rng(seed)
    det = FaceAnalysis.configured(model=VIDEO_DETECTOR)
    truth = {"fps": FPS, "size": SIZE, "seed": seed, "clips": [c.name for c in clip_list], "frames": [],
             "cuts": []}
    box = None
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=FPS, options={"crf": "14", "preset": "veryfast"})
        st.width = st.height = SIZE
        st.pix_fmt = "yuv420p"
        for clip, segs in zip(clip_list, plan(len(clip_list), rng)):
            truth["cuts"].append(len(truth["frames"]))
            for i, img in enumerate(_frames(clip, SECONDS * FPS)):
                kind, level = segs[i // FPS]
                if i % FPS == 0:   # a segment's shake angle and occluder place stay put, as a real one would
                    angle, place = float(rng.uniform(0, 180)), (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.35, 0.75)))
                if kind == "occluder":
                    d = det(img)
                    box = d.xyxy[int(np.argmax(d.side))] if len(d) else box
                frame = degrade.camera(img, kind, level, rng, box, angle, place)
                truth["frames"].append({"clip": clip.stem, "identity": identity(clip), "kind": kind, "level": level})
                for packet in st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    det.close()
    truth["cuts"] = truth["cuts"][1:]
    return truth


OVERLAY: dict = {}   # [section] overrides for every pipeline run (--config, then --detector and --landmarks)


def base_config(topk: int = TOPK) -> dict:
    return merged({"iqa": {"name": "piqe"}, "fr": {"model": str(FR_MODEL)},
                   "output": {"topk": topk, "min_gap": MIN_GAP}, "cascade": {"exhaustive": True}}, OVERLAY)


def merged(base: dict, overrides: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


def run_once(video: Path, out_dir: Path, name: str, overrides: dict, models) -> tuple[list, list[dict], dict]:
    """(kept rows as FaceRow, scored rows, summary) of one pipeline run."""
    from cafi_stream.config import load_config
    from cafi_stream.pipeline import run
    from cafi_stream.rows import read_face_rows, read_jsonl

    scores = out_dir / f"{name}.scores.jsonl"
    res = run(str(video), load_config(overrides=overrides), out_dir=out_dir / name, models=models,
              scores_out=scores, overwrite=True)   # our own scratch runs
    kept = read_face_rows(res.out_dir / "metadata.jsonl")
    scored = read_jsonl(scores)
    return kept, scored, res.summary


# -- measures of what was kept

def kept_count(frames: list[int], truth: dict) -> dict:
    """How many faces the tracks' top-k kept in all, and how many of them are clean: a ranker that keeps fewer faces
    can have a higher clean share without keeping more clean faces."""
    return {"kept": len(frames), "clean_kept": sum(truth["frames"][i]["kind"] == "clean" for i in frames)}


def clean_share(frames: list[int], truth: dict) -> float | None:
    """The share of clean faces among the faces of these frames."""
    count = kept_count(frames, truth)
    return round(count["clean_kept"] / count["kept"], 3) if frames else None


def top_by(rows: list[dict], key, group) -> list[dict]:
    """Per group (track or identity), the top-k rows by `key` (higher first), MIN_GAP seconds apart, chosen the
    way the pipeline chooses (select.pick_diverse): every signal and baseline is judged by the same rule."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[group(r)].append((key(r), r))   # each key once: the random one draws a new number per call
    kept = []
    for members in groups.values():
        members.sort(key=lambda m: -m[0])
        kept += [r for _, r in pick_diverse(members, TOPK, _apart, score=lambda m: m[0])]
    return kept


def _apart(m, chosen) -> bool:
    return all(abs(m[1]["pts_time"] - c[1]["pts_time"]) >= MIN_GAP for c in chosen)


def auc_by_kind(rows: list[dict], truth: dict, key) -> dict[str, float]:
    """Within each person: P(a clean face outranks a degraded face of `kind`), ties half; then mean over people."""
    per_kind: dict[str, list[float]] = defaultdict(list)
    people: dict[str, list] = defaultdict(list)
    for r in rows:
        gt = truth["frames"][r["frame_index"]]
        people[gt["identity"]].append((key(r), gt["kind"]))
    for faces in people.values():
        clean = np.array([k for k, kind in faces if kind == "clean"], np.float64)
        if not len(clean):
            continue
        for kind in degrade.CAMERA_KINDS:
            bad = np.array([k for k, kd in faces if kd == kind], np.float64)
            if len(bad):
                wins = (clean[:, None] > bad[None]).mean() + 0.5 * (clean[:, None] == bad[None]).mean()
                per_kind[kind].append(float(wins))
    return {k: round(float(np.mean(v)), 3) for k, v in per_kind.items()}


def per_identity(rows: list, cfg) -> list:
    """What `--per identity` keeps from a run's rows (FaceRow): the same library calls as the pipeline's finalize
    step."""
    from cafi_stream.fusion import ranking_fusion
    from cafi_stream.identity import assign_identities, top_per_identity

    rows = assign_identities(rows, cfg.identity.threshold)
    return top_per_identity(rows, cfg.output.topk, ranking_fusion(cfg.rank, any(r.iqa_model for r in rows)),
                            cfg.output.min_gap, cfg.diversity.max_similarity, cfg.diversity.pose_bins)


def cut_errors(summary_cuts: list[int], truth: dict, tolerance: int = 2) -> dict:
    """False and missed cuts: a found cut within `tolerance` frames of a true one is a hit."""
    true = truth["cuts"]
    missed = [c for c in true if not any(abs(c - f) <= tolerance for f in summary_cuts)]
    false = [f for f in summary_cuts if not any(abs(c - f) <= tolerance for c in true)]
    minutes = len(truth["frames"]) / FPS / 60
    return {"true_cuts": len(true), "missed": len(missed), "false": len(false),
            "false_per_minute": round(len(false) / minutes, 2)}


def evaluate(video: Path, truth: dict, out_dir: Path, rankers: dict) -> dict:
    from cafi_stream.config import load_config
    from cafi_stream.pipeline import Models

    base = base_config()
    models = Models.load(load_config(overrides=base))
    rng = np.random.default_rng(1)
    table: dict[str, dict] = {}
    exhaustive_rows: list[dict] = []
    cuts = None
    for name, overrides in rankers.items():
        t0 = time.perf_counter()
        cfg = merged(base, overrides)
        kept, scored, summary = run_once(video, out_dir, name, cfg, models)
        kept_id = per_identity(kept, load_config(overrides=cfg))
        if name == "cafi":
            exhaustive_rows, cuts = scored, summary.get("shot_cut_frames")
        key = ((lambda r: r["score"] if r["score"] is not None else -math.inf) if name.startswith("cafi")
               else (lambda r: r["quality"] if r["quality"] is not None else -math.inf))
        table[name] = {"kind": "ranker (pipeline run)",
                       "clean_per_track": clean_share([r.frame_index for r in kept], truth),
                       "clean_per_identity": clean_share([r.frame_index for r in kept_id], truth),
                       **kept_count([r.frame_index for r in kept], truth),
                       # over the faces the ranker scored (with the cascade, those that got an IQA call)
                       "auc_by_kind": auc_by_kind([r for r in scored if key(r) > -math.inf], truth, key),
                       "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:18s} {table[name]}", file=sys.stderr)
    models.close()
    rows = [dict(r, signals=row_signals(r)) for r in exhaustive_rows]
    person = lambda r: truth["frames"][r["frame_index"]]["identity"]   # noqa: E731
    track = lambda r: r["track_id"]   # noqa: E731
    keys = {f"signal:{n}": (lambda r, i=i: float(np.nan_to_num(r["signals"][i], nan=-math.inf)))
            for i, n in enumerate(NAMES)}
    keys["random (same faces)"] = lambda r: float(rng.random())
    keys["oracle"] = lambda r: (truth["frames"][r["frame_index"]]["kind"] == "clean") + 0.01 * r["serfiq"]
    for name, key in keys.items():
        frames = [r["frame_index"] for r in top_by(rows, key, track)]
        table[name] = {"kind": "single signal (same run's faces)" if name.startswith("signal:") else "reference",
                       "clean_per_track": clean_share(frames, truth), **kept_count(frames, truth),
                       "clean_per_identity": clean_share([r["frame_index"] for r in top_by(rows, key, person)],
                                                         truth),
                       "auc_by_kind": auc_by_kind(rows, truth, key)}
    for r in table.values():
        aucs = list(r["auc_by_kind"].values())
        r["auc_min"] = min(aucs) if aucs else None
    return {"table": table, "cuts": cut_errors(cuts or [], truth) if cuts is not None else None,
            "faces_scored": len(rows)}


def utility(out_dir: Path, topk: int = 5) -> dict:
    """lia_vox_obama.mov against the shared Obama photos: the mean cosine between each face and the photos' mean
    embedding, for the faces cafi keeps, the faces random choice keeps, and every face the pipeline scored."""
    from cafi_stream.align import align_largest_face
    from cafi_stream.config import load_config
    from cafi_stream.pipeline import Models

    video = VIDEOS / "lia_vox_obama.mov"
    base = merged(base_config(topk), {"cascade": {"exhaustive": False}})
    models = Models.load(load_config(overrides=base))
    photos = []
    for path in sorted((SHARED / "faces").glob("obama__*")):
        img = np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
        face = align_largest_face(img, models.faces)
        if face is not None:
            photos.append(face)
    template = models.serfiq(np.stack(photos)).embeddings.mean(axis=0)
    template /= np.linalg.norm(template)
    out = {"video": video.name, "photos": len(photos), "topk": topk}
    runs = {"cafi": {}, "random": {"rank": {"method": "random"}},
            "every scored face": {"rank": {"method": "random"}, "output": {"topk": 100000, "min_gap": 0.0},
                                  "cascade": {"exhaustive": True}}}
    every = (np.zeros(0), np.zeros(0))   # every scored face's cosine and time
    for name, overrides in runs.items():
        kept, _, _ = run_once(video, out_dir, "obama_" + name.replace(" ", "_"), merged(base, overrides), models)
        cos = [float(np.dot(r.embedding, template)) for r in kept]
        out[name] = {"faces": len(cos), "mean_genuine_cosine": round(float(np.mean(cos)), 4) if cos else None}
        if name == "every scored face":
            every = (np.array(cos), np.array([r.pts_time for r in kept]))
    models.close()
    if len(every[0]) and out["cafi"]["faces"]:
        out["chance"] = chance(*every, out["cafi"]["faces"], out["cafi"]["mean_genuine_cosine"])
    return out


def chance(cos: np.ndarray, times: np.ndarray, k: int, kept_mean: float, draws: int = 4000) -> dict:
    """The mean genuine cosine of `k` faces drawn at random from every scored face, MIN_GAP seconds apart as the
    pipeline keeps them, `draws` times: its mean, standard deviation and 95% range, and the share of draws at or
    under the kept faces' mean (how far from chance that is)."""
    rng = np.random.default_rng(0)
    means = []
    for _ in range(draws):
        chosen: list[int] = []
        for i in rng.permutation(len(cos)):
            if all(abs(times[i] - times[j]) >= MIN_GAP for j in chosen):
                chosen.append(int(i))
                if len(chosen) == k:
                    break
        means.append(float(cos[chosen].mean()))
    m = np.array(means)
    return {"draws": draws, "mean": round(float(m.mean()), 4), "std": round(float(m.std()), 4),
            "range_95": [round(float(v), 4) for v in np.percentile(m, [2.5, 97.5])],
            "share_at_or_under_kept": round(float((m <= kept_mean).mean()), 3)}


def readme_table(result: dict) -> str:
    kinds = degrade.CAMERA_KINDS
    lines = ["| ranker or signal | clean share per track | per identity | faces kept (clean) | "
             + " | ".join(kinds) + " |", "|---|---|---|---|" + "---|" * len(kinds)]
    for name, r in result["table"].items():
        auc = r["auc_by_kind"]
        lines.append(f"| `{name}` | {r['clean_per_track']} | {r['clean_per_identity']} | "
                     f"{r['kept']} ({r['clean_kept']}) | "
                     + " | ".join(str(auc.get(k, "")) for k in kinds) + " |")
    v, c, u = result["video"], result["cuts"], result["utility"]
    lines += ["", f"{v.get('people', 'report').capitalize()} clips only ({len(v['clips'])} clips, {v['frames']} "
                  f"frames, {v['clean_share']:.0%} clean, "
                  f"top-{TOPK}, min gap {MIN_GAP} s, IQA: PIQE, detector "
                  f"{result['detect']['model']}, landmarks {result['detect']['landmarks']}). Columns after the faces kept: within-person AUC "
                  "per degradation kind.",
              (f"Shot cuts: {c['true_cuts']} true, {c['missed']} missed, {c['false']} false "
               f"({c['false_per_minute']} per minute)." if c is not None else "Shot cuts: not measured (no exhaustive "
                                                                               "`cafi` run)."),
              utility_line(u)]
    return "\n".join(lines)


def utility_line(u: dict | None) -> str:
    if u is None:
        return "Utility: not measured."
    line = (f"Utility ({u['video']}, {u['photos']} Obama photos, top-{u['topk']}): mean genuine cosine of the faces "
            f"cafi keeps {u['cafi']['mean_genuine_cosine']}, random choice {u['random']['mean_genuine_cosine']}, "
            f"every scored face {u['every scored face']['mean_genuine_cosine']}")
    c = u.get("chance")
    if c:
        line += (f"; {c['draws']} random choices of as many faces from every scored face average {c['mean']} (95% "
                 f"between {c['range_95'][0]} and {c['range_95'][1]}), {c['share_at_or_under_kept']:.0%} of them at "
                 "or under cafi's")
    return line + "."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rankers", help="comma-separated subset of " + ",".join(RANKERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--readme", help="rewrite the table between <!-- real:start/end --> in this file")
    p.add_argument("--detector", help="the pipeline's face detector (default: configs/default.toml)")
    p.add_argument("--landmarks", choices=["auto", "keypoints", "mesh"], help="where alignment points and mask come from")
    p.add_argument("--config", help="a TOML overlay for every pipeline run (to compare settings)")
    p.add_argument("--clips", choices=["report", "fit"], default="report",
                   help="which people to run on: fit (to choose a setting) or report (default)")
    p.add_argument("--no-utility", action="store_true", help="skip the utility check")
    args = p.parse_args(argv)
    if args.readme and args.clips != "report":
        p.error("--readme publishes the report clips' figures: not with --clips fit")
    if args.config:
        import tomllib

        OVERLAY.update(tomllib.loads(Path(args.config).read_text()))
    OVERLAY.setdefault("detect", {}).update(
        {k: v for k, v in (("model", args.detector), ("landmarks", args.landmarks)) if v})
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rankers = {k: RANKERS[k] for k in (args.rankers.split(",") if args.rankers else RANKERS)}
    t0 = time.perf_counter()
    people = clips(args.clips)
    video = out / "runs" / "real_video.mp4"
    truth = build_video(people, video, args.seed)
    (out / "runs" / "truth.json").write_text(json.dumps(truth))
    result = evaluate(video, truth, out / "runs", rankers)
    other = "fit" if args.clips == "report" else "report"
    result["video"] = {"clips": [c.name for c in people], "frames": len(truth["frames"]), "seed": args.seed,
                       "clean_share": sum(f["kind"] == "clean" for f in truth["frames"]) / len(truth["frames"]),
                       "people": args.clips, f"{other}_clips_never_used_here": [c.name for c in clips(other)],
                       "overlay": OVERLAY}
    from cafi_stream.config import load_config

    detect = load_config(overrides=base_config()).detect
    result["detect"] = {"model": detect.model, "landmarks": detect.landmarks}
    result["utility"] = None if args.no_utility else utility(out / "runs")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "real.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.readme:
        replace_block(Path(args.readme), "real", readme_table(result))
    print(readme_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
