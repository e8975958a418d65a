"""Per-track top-k: SER-FIQ threshold, time gap, bounded pool."""

import dataclasses

import numpy as np

from cafi_stream.select import ScoredFace, Selector, SerfiqRule


def face(t, score, serfiq=0.6, track=1):
    return ScoredFace(track_id=track, frame_index=int(t * 30), pts_time=t, bbox=np.zeros(4), det_score=0.9,
                      landmarks=np.zeros((5, 2)), serfiq=serfiq, embedding=np.zeros(4), iqa=score, score=score,
                      quality=score)


def feed(sel, faces):
    for f in faces:
        if sel.passes(f.track_id, f.serfiq):
            sel.offer(f)


def test_topk_best_first_and_min_gap():
    sel = Selector(topk=3, min_gap=0.5, rule=SerfiqRule(quantile=0))
    rng = np.random.default_rng(0)
    faces = [face(i / 30, float(s)) for i, s in enumerate(rng.random(600))]
    feed(sel, faces)
    kept = sel.close(1)
    assert [k.rank for k in kept] == [1, 2, 3]
    scores = [k.face.score for k in kept]
    assert scores == sorted(scores, reverse=True)
    times = sorted(k.face.pts_time for k in kept)
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:]))
    assert kept[0].face.score == max(f.score for f in faces)
    assert sel.close(1) == []


def test_pool_memory_is_bounded():
    sel = Selector(topk=5, min_gap=0.0, rule=SerfiqRule(quantile=0), pool_factor=3)
    feed(sel, [face(i / 30, float(i % 97)) for i in range(30_000)])
    assert len(sel.pools[1].faces) <= 15


def test_relative_rule_drops_the_track_s_low_serfiq_faces():
    sel = Selector(topk=5, min_gap=0.0, rule=SerfiqRule(quantile=0.5))
    # IQA prefers the faces that SER-FIQ says are unrecognisable: the filter must still drop them.
    faces = [face(i, score=10.0 if i % 2 else 1.0, serfiq=0.45 if i % 2 else 0.56) for i in range(40)]
    feed(sel, faces)
    kept = sel.close(1)
    assert len(kept) == 5 and all(k.face.serfiq == 0.56 for k in kept)


def test_absolute_rule_and_tracks_are_independent():
    sel = Selector(topk=2, min_gap=0.0, rule=SerfiqRule(quantile=0, min_score=0.5))
    feed(sel, [face(1, 5.0, serfiq=0.4, track=1), face(2, 1.0, serfiq=0.6, track=1),
               face(1, 3.0, serfiq=0.7, track=2)])
    assert [k.face.score for k in sel.close(1)] == [1.0]
    assert [k.face.score for k in sel.close(2)] == [3.0]


def test_zsum_fusion_trades_serfiq_against_quality():
    sel = Selector(topk=1, min_gap=0.0, rule=SerfiqRule(quantile=0.5), fusion="zsum")
    # A: best quality, worst SER-FIQ. B: both good. C, D: average. zsum keeps B; the filter rule would drop
    # under-median SER-FIQ and keep the best quality among the rest.
    faces = [face(0, 10.0, serfiq=0.40), face(1, 9.0, serfiq=0.58), face(2, 5.0, serfiq=0.50),
             face(3, 5.0, serfiq=0.50)]
    feed(sel, faces)
    assert sel.close(1)[0].face.pts_time == 1


def test_pose_bins_keep_side_views_that_rank_below_many_frontal_faces():
    """Many good frontal faces and a few weaker side views: with pose bins the best left and right views survive
    the bounded pool and are kept; without, the top-k is all frontal."""
    faces = [face(i, 10.0 + i) for i in range(40)]   # frontal, 1 s apart
    for i, pose in enumerate(["left", "left", "right"]):
        faces.append(dataclasses.replace(face(100 + i, 1.0 + i), pose=pose))
    for bins in (False, True):
        sel = Selector(topk=4, min_gap=0.5, rule=SerfiqRule(quantile=0), pose_bins=bins)
        feed(sel, faces)
        poses = [k.face.pose for k in sel.close(1)]
        if bins:
            assert sorted(poses) == ["frontal", "frontal", "left", "right"]
        else:
            assert poses == ["frontal"] * 4


def test_max_similarity_drops_near_duplicates():
    a, b, c = np.eye(4)[0], (np.eye(4)[0] + 0.1 * np.eye(4)[1]), np.eye(4)[2]
    b = b / np.linalg.norm(b)
    faces = [dataclasses.replace(face(t, s), embedding=e) for t, s, e in ((0, 3.0, a), (1, 2.0, b), (2, 1.0, c))]
    sel = Selector(topk=3, min_gap=0.5, rule=SerfiqRule(quantile=0), max_similarity=0.9)
    feed(sel, faces)
    assert [k.face.pts_time for k in sel.close(1)] == [0, 2]   # the near-copy of the best face is dropped


def test_three_good_seconds_give_three_faces_min_gap_apart():
    # Seconds 1-4 of an 8 s track are good, and get better as they go (a face turning to the camera); the rest is
    # poor. A pool that let each better face replace its neighbour would carry one face along the good seconds and
    # leave the top-3 to a poor one; a greedy top-3 could take a good face that rules out two others.
    rng = np.random.default_rng(1)
    times = np.round(np.arange(0, 8, 0.1), 2)
    faces = [face(t, (1.0 + 0.05 * t if 1 <= t < 4 else -1.0) + 0.01 * rng.random()) for t in times]
    sel = Selector(topk=3, min_gap=1.0, rule=SerfiqRule(quantile=0))
    feed(sel, faces)
    kept = sel.close(1)
    assert [k.face.score > 0 for k in kept] == [True] * 3
    assert kept[0].face.score == max(f.score for f in faces)
    times = sorted(k.face.pts_time for k in kept)
    assert all(b - a >= 1.0 for a, b in zip(times, times[1:]))


def test_pick_diverse_fills_the_most_places_with_the_highest_total():
    import itertools

    from cafi_stream.select import pick_diverse

    rng = np.random.default_rng(0)
    fits = lambda x, kept: all(abs(x[0] - k[0]) >= 1.0 for k in kept)   # noqa: E731
    for _ in range(200):
        items = sorted(((float(t), float(s)) for t, s in zip(rng.random(12) * 6, rng.normal(size=12))),
                       key=lambda x: -x[1])
        k = int(rng.integers(1, 5))
        got = pick_diverse(items, k, fits, score=lambda x: x[1])
        assert got[0] == items[0] and all(fits(x, [y for y in got if y is not x]) for x in got)
        best = max((len(c) + 1, sum(x[1] for x in c)) for n in range(k) for c in itertools.combinations(items[1:], n)
                   if all(fits(x, list(c[:i]) + [items[0]]) for i, x in enumerate(c)))
        assert (len(got), round(sum(x[1] for x in got), 9)) == (best[0], round(best[1] + items[0][1], 9))
