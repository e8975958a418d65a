"""Identity clustering of tracks (average linkage on embeddings, never across tracks seen at the same time)."""

import numpy as np

from cafi_stream.identity import assign_identities, cluster
from cafi_stream.rows import FaceRow


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_average_linkage_and_cannot_link():
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=64)), unit(rng.normal(size=64))
    vecs = np.stack([unit(a + 0.3 * rng.normal(size=64) / 8) for _ in range(3)] +
                    [unit(b + 0.3 * rng.normal(size=64) / 8) for _ in range(2)])
    labels = cluster(vecs, 0.5)
    assert len(set(labels[:3])) == 1 and len(set(labels[3:])) == 1 and labels[0] != labels[3]
    cannot = np.zeros((5, 5), bool)
    cannot[0, 1] = cannot[1, 0] = True
    labels = cluster(vecs, 0.5, cannot)
    assert labels[0] != labels[1]


def face_row(video: str, track_id: int, start: float, end: float, embedding) -> FaceRow:
    return FaceRow(file_name="f.jpg", aligned_file="a.png", masked_file="m.png", source="s.mp4", track_id=track_id,
                   rank=1, frame_index=0, pts_time=start, bbox=(0, 0, 1, 1), det_score=1.0, landmarks=(), serfiq=0.5,
                   iqa_model=None, iqa=None, quality=0.5, score=0.5, sharpness=100.0, yaw=0.0, pose="frontal",
                   capture=None, similarity=None, track_start=start, track_end=end, embedding=tuple(embedding),
                   video=video)


def test_overlapping_tracks_of_one_video_are_two_people():
    e = unit(np.ones(8)).tolist()
    rows = assign_identities([face_row("v", 1, 0.0, 5.0, e), face_row("v", 2, 4.0, 9.0, e),
                              face_row("v", 3, 10.0, 12.0, e), face_row("w", 1, 0.0, 5.0, e)], 0.5)
    ids = [r.identity_id for r in rows]
    assert ids[0] != ids[1]            # seen together
    assert ids[2] in (ids[0], ids[1])  # later in the same video: may be either
    assert ids[3] in (ids[0], ids[1])  # another video: no time constraint


def test_matches_scipy_average_linkage():
    """Without constraints the clusters are exactly average-linkage at distance 1 - threshold."""
    from scipy.cluster.hierarchy import fcluster, linkage

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 32))
    vecs = np.stack([unit(centres[k] + rng.normal(scale=0.9, size=32)) for k in rng.integers(0, 6, 120)])
    for threshold in (0.2, 0.35, 0.5):
        ours = cluster(vecs, threshold)
        ref = fcluster(linkage(vecs, "average", metric="cosine"), t=1 - threshold, criterion="distance")
        pairs = lambda lab: {(a, b) for a in range(len(lab)) for b in range(a) if lab[a] == lab[b]}
        assert pairs(ours) == pairs(ref)
        assert 1 < len(set(ours)) < len(vecs)


def test_a_metadata_line_round_trips_through_the_schema(hamilton_run):
    """Every line the writer wrote reads back into a `FaceRow` and writes out as the same JSON object."""
    import json

    from cafi_stream.rows import read_face_rows

    proc, out = hamilton_run
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    rows = read_face_rows(out / "metadata.jsonl")
    assert rows and len(rows) == len(lines)
    for row, line in zip(rows, lines):
        assert json.loads(json.dumps(row.to_json())) == line
        assert row.identity_id is not None and all((out / name).is_file() for name in row.images)
