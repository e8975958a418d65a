"""Identity clustering of tracks (average linkage on embeddings, never across tracks seen at the same time)."""

import numpy as np

from cafi_stream.identity import assign_identities, cluster


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


def test_overlapping_tracks_of_one_video_are_two_people():
    e = unit(np.ones(8)).tolist()
    rows = [{"video": "v", "track_id": 1, "embedding": e, "track_start": 0.0, "track_end": 5.0},
            {"video": "v", "track_id": 2, "embedding": e, "track_start": 4.0, "track_end": 9.0},
            {"video": "v", "track_id": 3, "embedding": e, "track_start": 10.0, "track_end": 12.0},
            {"video": "w", "track_id": 1, "embedding": e, "track_start": 0.0, "track_end": 5.0}]
    assign_identities(rows, 0.5)
    ids = [r["identity_id"] for r in rows]
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
