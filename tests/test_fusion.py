"""The learned fusion: its packaged parameters keep their promises, and on real video of people it was never fitted
on it keeps cleaner faces than random choice, also when its IQA signal is broken."""

import json
import math
import sys
from collections import defaultdict

import numpy as np
import pytest

from conftest import ROOT
from cafi_stream.config import load_config
from cafi_stream.fusion import ABSOLUTE, NAMES, PARAMS, FusionModel, RunningStats, signal_vector

sys.path.insert(0, str(ROOT / "scripts"))
import eval_real  # noqa: E402


def test_packaged_parameters_keep_their_bounds():
    p = json.loads(PARAMS.read_text())
    for iqa in (True, False):
        m = FusionModel.load(iqa=iqa)
        assert m.weights.sum() == pytest.approx(1.0, abs=1e-3)
        assert (m.weights >= 0).all() and (m.weights <= m.cap + 1e-6).all()   # no signal decides alone
        assert m.weights[NAMES.index("serfiq")] >= m.floor["serfiq"] - 1e-6
        assert (m.weights[NAMES.index("iqa")] >= m.floor["iqa"] - 1e-6) == iqa
        assert m.weights[NAMES.index("typicality")] >= m.floor.get("typicality", 0.0) - 1e-6
    # fitted on the fit clips only: none of the clips the evaluation reports on
    assert not set(p["fitted_on"]["clips"]) & {c.name for c in eval_real.clips("report")}
    # and on cards of other people than those of the card evaluation (scripts/eval_selection.py)
    import eval_selection

    people = {d: {f.name.split("__")[0] for f in (eval_real.SHARED / d).iterdir() if "__" in f.name}
              for d in (p["fitted_on"]["cards"]["photos"], eval_selection.PHOTOS.relative_to(eval_real.SHARED))}
    fit_people, report_people = people.values()
    assert len(fit_people) >= 20 and len(report_people) >= 5 and not fit_people & report_people


def test_running_statistics_match_the_batch_ones():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, len(NAMES)))
    x[::7, 1] = np.nan   # faces without an IQA call
    stats = RunningStats()
    for row in x:
        stats.add(row)
    assert np.allclose(stats.level, np.nanmean(x, axis=0))
    assert np.allclose(stats.z(x[-2]), (x[-2] - np.nanmean(x, axis=0)) / np.nanstd(x, axis=0))
    assert stats.z(x[-1])[1] == 0.0   # no IQA score: the track's typical value


def test_a_sources_own_grain_is_its_baseline():
    """An absolute signal (noise, blockiness) penalises a face under its fixed threshold only as far as the face is
    also under its track's own level: in a grainy source the clean faces are not outranked by smoothed ones."""
    m = FusionModel.load()
    t, s = m.thresholds[:, 0], m.thresholds[:, 1]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, len(NAMES)))
    k = NAMES.index("noise")
    x[:, k] = t[k] - 4 * s[k] + rng.normal(0, 0.2 * s[k], len(x))   # every face far noisier than clean fit faces
    x[-1, k] = t[k] + s[k]                                          # one smoothed face: less noise than its source
    x[-2, k] = x[:-2, k].mean() - 2.5 * s[k]                        # one face much noisier than its source
    f = m.group_features(x)
    assert (f[:-2, k] == 0).mean() > 0.9 and f[-1, k] == 0   # the source's level costs nothing
    assert f[-2, k] < -0.9                                   # what is noisier than the source does
    # a clean source keeps the fixed threshold: a face under it is penalised though the track is clean
    x[:, k] = t[k] + s[k]
    x[-2, k] = t[k] - s[k]
    assert m.group_features(x)[-2, k] == pytest.approx(-1.0, abs=0.1)
    assert ABSOLUTE[k]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Two report clips (people the fusion never saw), degraded per second, run with the default ranker and
    random choice; --iqa none keeps it short."""
    from cafi_stream.pipeline import Models

    work = tmp_path_factory.mktemp("fusion")
    clips = [c for c in eval_real.clips("report") if c.name.startswith("voxceleb2_")][:2]
    truth = eval_real.build_video(clips, work / "video.mp4", seed=3)
    base = eval_real.merged(eval_real.base_config(), {"iqa": {"name": "none"}})
    models = Models.load(load_config(overrides=base))
    runs = {name: eval_real.run_once(work / "video.mp4", work, name, eval_real.merged(base, over), models)
            for name, over in (("cafi", {}), ("random", {"rank": {"method": "random"}}),
                               ("top-5", {"output": {"topk": 5}}),
                               ("top-5, no max_drop", {"output": {"topk": 5}, "rank": {"max_drop": 0.0}}))}
    models.close()
    return truth, runs, work


def test_fusion_beats_random_on_unseen_people(small_run):
    truth, runs, _ = small_run
    (cafi, cafi_scored, _), (random, random_scored, _) = runs["cafi"], runs["random"]
    assert len(cafi) >= 4 and len(random) >= 4
    clean = eval_real.clean_share([r.frame_index for r in cafi], truth)
    # random choice keeps, on average, the clean share of the faces it chooses from (one draw of 6 is noisy)
    expected_random = eval_real.clean_share([r["frame_index"] for r in random_scored], truth)
    assert clean >= 0.8 and clean > expected_random + 0.3, (clean, expected_random, len(cafi))
    aucs = eval_real.auc_by_kind(cafi_scored, truth, lambda r: r["score"])
    assert np.mean(list(aucs.values())) > 0.85, aucs
    # every scored face's row explains its rank with the same score the selector used
    assert all(r["score"] is not None for r in cafi_scored)


def test_a_track_keeps_no_face_far_under_its_best(small_run):
    """`rank.max_drop`: a track keeps no face whose fused score is far under its best, even when its top-k has
    room (five places a track here, for about three clean seconds). On these clips that leaves degraded faces out,
    not clean ones."""
    truth, runs, _ = small_run
    kept = {name: [r.frame_index for r in runs[name][0]] for name in ("top-5", "top-5, no max_drop")}
    clean = {name: sum(truth["frames"][i]["kind"] == "clean" for i in f) for name, f in kept.items()}
    degraded = {name: len(f) - clean[name] for name, f in kept.items()}
    assert degraded["top-5"] < degraded["top-5, no max_drop"] and clean["top-5"] >= clean["top-5, no max_drop"], \
        (clean, degraded)
    best = defaultdict(lambda: -math.inf)
    for r in runs["top-5"][0]:
        best[r.track_id] = max(best[r.track_id], r.score)
    assert all(r.score >= best[r.track_id] - load_config().rank.max_drop for r in runs["top-5"][0])


def test_a_broken_signal_does_not_decide(small_run):
    """Turn the IQA signal upside down (an IQA model that prefers noisy, dark faces, as PIQE does): the capped
    weights keep the ranking's AUC well above chance."""
    truth, runs, _ = small_run
    rows = runs["cafi"][1]
    m = FusionModel.load(iqa=True)
    x = np.stack([signal_vector(r["serfiq"], None, r["capture"]) for r in rows])
    clean = np.array([truth["frames"][r["frame_index"]]["kind"] == "clean" for r in rows])
    x[:, NAMES.index("iqa")] = np.where(clean, -1.0, 1.0)   # the worst possible IQA: inverted and certain
    s = m.scores(x)
    auc = (s[clean][:, None] > s[~clean][None]).mean()
    assert auc > 0.75, auc


def test_the_cascade_keeps_faces_that_both_networks_judged(small_run):
    """The default cascade with the offline IQA (PIQE): faces enter their track's pool once SER-FIQ has scored
    them, the IQA budget refines the ranking, and each face kept in the end has had its IQA call."""
    from cafi_stream.pipeline import Models

    truth, runs, work = small_run
    cfg = eval_real.merged(eval_real.base_config(), {"cascade": {"exhaustive": False}})
    models = Models.load(load_config(overrides=cfg))
    kept, scored, summary = eval_real.run_once(work / "video.mp4", work, "cascade", cfg, models)
    models.close()
    assert len(kept) >= 4 and all(r.iqa is not None for r in kept)
    assert summary["faces"]["iqa_calls"] < len(scored) / 2   # the budget, not every face
    clean = eval_real.clean_share([r.frame_index for r in kept], truth)
    expected_random = eval_real.clean_share([r["frame_index"] for r in runs["random"][1]], truth)
    assert clean >= 0.8 and clean > expected_random + 0.3, (clean, expected_random, len(kept))
