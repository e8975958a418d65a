"""The scoring cascade's pieces: IQA scheduling under a budget, micro-batching, cheap gates."""

import numpy as np

from cafi_stream.batching import MicroBatcher
from cafi_stream.cascade import IqaScheduler, yaw_ratio


class Face:
    def __init__(self, track_id, pts, proxy):
        self.track_id, self.pts, self.proxy = track_id, pts, proxy


def feed(s, faces, fps=30):
    """Submit faces in time order; return the faces scored and when."""
    scored = []
    for f in faces:
        s.submit(f.track_id, f.pts, f.proxy, f)
        scored += s.due(f.pts)
    return scored


def test_one_candidate_per_window_the_sharpest():
    s = IqaScheduler(budget=100, burst=100, window=1.0, max_age=5)
    faces = [Face(1, i / 30, proxy=float(i % 30 == 12)) for i in range(90)]   # 3 windows, sharpest at frame 12
    scored = feed(s, faces) + s.due(3.0, track_id=1)
    assert [round(f.pts * 30) for f in scored] == [12, 42, 72]


def test_budget_bounds_calls_and_prefers_high_proxy():
    s = IqaScheduler(budget=1.0, burst=2, window=0.25, max_age=100)
    rng = np.random.default_rng(0)
    faces = [Face(t, i / 30, float(rng.random())) for i in range(300) for t in (1, 2, 3)]   # 10 s, 3 tracks
    scored = feed(s, faces)
    assert len(scored) <= 2 + 10 * 1.0
    assert np.mean([f.proxy for f in scored]) > 0.6   # the best of each queue, not a uniform draw


def test_ending_track_gets_its_last_window_and_drops_the_rest():
    s = IqaScheduler(budget=0.0, burst=1, window=1.0, max_age=100)
    feed(s, [Face(7, 0.1, 0.5), Face(7, 1.5, 0.9)])   # token spent on the first window
    assert s.due(2.0, track_id=7) == []   # no budget left: dropped, not kept forever
    assert s.due(10.0) == []


def test_veto_and_exhaustive():
    vetoed = IqaScheduler(budget=10, burst=10, window=0.0, max_age=10, could_enter=lambda f: f.proxy > 0.5)
    assert [f.proxy for f in feed(vetoed, [Face(1, 0, 0.2), Face(1, 1, 0.8), Face(1, 2, 0.1)])
            + vetoed.due(3, track_id=1)] == [0.8]
    everything = IqaScheduler(budget=0.001, burst=0, window=1.0, max_age=0, exhaustive=True)
    assert len(feed(everything, [Face(1, i / 30, 0.1) for i in range(60)])) == 60


def test_micro_batcher_bounds_batch_and_wait():
    now = [0.0]
    calls = []
    b = MicroBatcher(lambda xs: (calls.append(len(xs)), [x * 2 for x in xs])[1], max_batch=4, max_wait_ms=50,
                     clock=lambda: now[0])
    out = []
    for i in range(10):
        b.add(i)
        out += b.poll()
    assert calls == [4, 4] and [r for _, r in out] == [0, 2, 4, 6, 8, 10, 12, 14]
    b.add(10)
    assert b.poll() == []
    now[0] = 0.06   # the oldest waited 60 ms
    assert [r for _, r in b.poll()] == [16, 18, 20]
    assert b.flush() == [] and b.calls == 11


def test_yaw_ratio_frontal_and_turned():
    frontal = np.array([[40, 50], [72, 50], [56, 70], [44, 90], [68, 90]], np.float32)
    turned = frontal.copy()
    turned[2, 0] += 16   # nose half an eye distance towards one side
    rolled = frontal @ np.array([[0.8, -0.6], [0.6, 0.8]], np.float32).T
    assert abs(yaw_ratio(frontal)) < 1e-6 and abs(yaw_ratio(rolled)) < 1e-5
    assert abs(yaw_ratio(turned) - 0.5) < 1e-6


def test_profile_faces_by_their_eye_span():
    """Eyes about a third of the box apart: frontal; collapsed together (a face seen from the side, where the nose
    offset along the eye line says nothing): profile."""
    from cafi_stream.cascade import in_profile

    frontal = np.array([[38, 50], [74, 50], [56, 70], [42, 88], [70, 88]], np.float32)
    collapsed = np.array([[90, 50], [101, 56], [61, 110], [111, 160], [115, 161]], np.float32)   # a real one, shifted
    assert not in_profile(frontal, 112) and in_profile(collapsed, 293)
    assert abs(yaw_ratio(collapsed)) < 0.45   # what the yaw gate alone let through


def test_joined_engine_gives_each_thread_its_own_rows_from_shared_calls():
    """serve's cameras share one engine: arrays from 8 threads that arrive while it is busy are joined into fewer
    calls, each thread gets exactly its own rows back (also through a dataclass result), and an engine error reaches
    every caller of that call."""
    import threading
    import time

    from cafi_stream.batching import JoinedEngine
    from cafi_stream.serfiq import SerFiqResult

    def engine(x):
        time.sleep(0.01)
        return SerFiqResult(x[:, 0] * 2, x * 3)

    joined = JoinedEngine(engine, max_batch=64)
    results, errors = {}, []

    def call(i):
        x = np.full((i % 3 + 1, 4), float(i))
        r = joined(x)
        results[i] = (x, r)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, r in results.values():
        assert np.array_equal(r.scores, x[:, 0] * 2) and np.array_equal(r.embeddings, x * 3)
    assert joined.joined_rows == sum(len(x) for x, _ in results.values())
    assert joined.joined_calls < 8

    def broken(x):
        raise RuntimeError("engine failed")

    failing = JoinedEngine(broken, max_batch=8)
    try:
        failing(np.zeros((1, 2)))
    except RuntimeError as e:
        errors.append(str(e))
    assert errors == ["engine failed"]
