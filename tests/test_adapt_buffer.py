"""The Trigger Buffer on hand-made embeddings: stability (ARI, centres matched by optimal assignment), the
flush that resets it, online assignment, merging, and hand-off."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from s3lora_cli.adapt.buffer import (  # noqa: E402
    NOISE,
    Bucket,
    BufferState,
    Cluster,
    Sample,
    TriggerBuffer,
    compare_labelings,
    keywords_of,
    unit,
)
from s3lora_cli.adapt.policy import BufferPolicy  # noqa: E402

DIM = 12


def blob_vectors(seed: int, centres: np.ndarray, per: int, spread: float = 0.05):
    """``per`` points around each centre (rows of ``centres``), interleaved: labels 0, 1, 2, 0, 1, 2, ..."""
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for _ in range(per):
        for k, c in enumerate(centres):
            points.append(c + spread * rng.normal(size=c.shape))
            labels.append(k)
    return np.array(points, dtype=np.float32), labels


def axes(*indices: int) -> np.ndarray:
    return np.eye(DIM)[list(indices)] * 3.0


def sample(line: int, vector, text: str = "x") -> Sample:
    return Sample(line=line, text=text, record={"line": line}, embedding=np.asarray(vector, dtype=np.float32))


def test_compare_labelings_pairs_centres_by_assignment_not_label_number():
    vectors = unit(np.concatenate([axes(0, 0, 0), axes(1, 1, 1), axes(2, 2, 2)]))
    first = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    renamed = [2, 2, 2, 0, 0, 0, 1, 1, 1]  # the same partition under other numbers
    result = compare_labelings(first, renamed, vectors, BufferPolicy())
    assert result.ari == pytest.approx(1.0) and result.centre_cosine == pytest.approx(1.0) and result.stable
    # Paired by label number instead, every centre would meet an orthogonal one (cosine 0).
    split = [0, 0, 0, 1, 1, 1, 1, 1, 1]
    worse = compare_labelings(first, split, vectors, BufferPolicy())
    assert worse.ari < 0.8 and not worse.stable


def test_compare_labelings_without_clusters_is_never_stable():
    vectors = unit(axes(0, 1, 2))
    result = compare_labelings([NOISE] * 3, [NOISE] * 3, vectors, BufferPolicy())
    assert result.ari == pytest.approx(1.0) and result.centre_cosine == -1.0 and not result.stable


def feed(buffer: TriggerBuffer, vectors, texts=None) -> list[dict]:
    texts = texts or ["x"] * len(vectors)
    return [buffer.add(sample(i + 1, v, t), "all") for i, (v, t) in enumerate(zip(vectors, texts, strict=True))]


def test_three_blobs_become_stable_after_two_reclusterings_and_the_buffer_is_flushed():
    vectors, truth = blob_vectors(0, axes(0, 1, 2), per=9)
    policy = BufferPolicy(min_buffer=24, min_cluster_size=4, min_cluster=5)
    state = BufferState()
    events = feed(TriggerBuffer(state, policy), vectors)
    formed_at = [i for i, e in enumerate(events) if e["formed"]]
    # re-clustered at the 24th sample (no previous labeling), stable at the 25th
    assert [i for i, e in enumerate(events) if e["reclustered"]][:2] == [23, 24] and formed_at[0] == 24
    assert state.reclusterings == 2 and state.stabilisations == [{"line": 25, "reclusterings": 2}]
    assert len(state.clusters) == 3
    for c in state.clusters:  # each cluster one blob
        assert len({truth[s.line - 1] for s in c.members}) == 1
    # later samples join their blob's cluster online; the flushed buffer holds only noise
    assert all(e["assigned"] is not None for e in events[25:])
    assert sum(len(c.members) for c in state.clusters) + len(state.buckets["all"].samples) == len(vectors)
    assert state.buckets["all"].previous is None


def test_an_unstable_labeling_keeps_the_buffer_and_its_previous_labeling():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(12, DIM)).astype(np.float32)  # no structure: HDBSCAN finds at most noise
    policy = BufferPolicy(min_buffer=10, min_cluster_size=4)
    state = BufferState()
    events = feed(TriggerBuffer(state, policy), vectors)
    assert [e["reclustered"] for e in events] == [False] * 9 + [True] * 3
    assert not state.clusters and len(state.buckets["all"].samples) == 12
    assert len(state.buckets["all"].previous) == 12


def test_clusters_whose_centres_meet_merge_and_the_lower_id_survives():
    policy = BufferPolicy(merge_cosine=0.8)
    state = BufferState()
    buffer = TriggerBuffer(state, policy)
    a = [sample(1, [1, 0, 0]), sample(2, [1, 0.1, 0])]
    b = [sample(3, [1, 0.3, 0]), sample(4, [1, 0.2, 0])]
    c = [sample(5, [0, 0, 1])]
    origin = np.zeros(3)
    for cid, members in ((1, a), (2, b), (3, c)):
        cluster = Cluster(id=cid, bucket="all", members=list(members), centre=np.zeros(0), keywords=[])
        buffer._refresh(cluster, origin)
        state.clusters.append(cluster)
    buffer._merge("all", origin)
    assert [c.id for c in state.clusters] == [1, 3]
    assert [s.line for s in state.clusters[0].members] == [1, 2, 3, 4]
    expected = unit(unit(np.array([[1, 0, 0], [1, 0.1, 0], [1, 0.3, 0], [1, 0.2, 0]])).mean(axis=0))
    assert np.allclose(state.clusters[0].centre, expected, atol=1e-12)


def test_assignment_weighs_cosine_and_keyword_overlap():
    policy = BufferPolicy(assign_threshold=0.6, assign_weight_cosine=0.7, keywords=2)
    state = BufferState()
    buffer = TriggerBuffer(state, policy)
    state.buckets["all"] = Bucket(origin=np.zeros(3))
    members = [sample(1, [1, 0, 0], "spell garden backwards"), sample(2, [1, 0, 0], "spell planet backwards")]
    cluster = Cluster(id=1, bucket="all", members=members, centre=np.zeros(0), keywords=[])
    buffer._refresh(cluster, np.zeros(3))
    state.clusters.append(cluster)
    assert cluster.keywords == ["backwards", "spell"]
    # cosine 0.6: 0.42 + 0.3 * (2/2) = 0.72 joins; 0.42 + 0.3 * (0/2) = 0.42 stays in the buffer
    near = [0.6, 0.8, 0.0]
    assert buffer.add(sample(3, near, "spell rocket backwards"), "all")["assigned"] == 1
    assert buffer.add(sample(4, near, "add two numbers"), "all")["assigned"] is None
    assert [s.line for s in state.buckets["all"].samples] == [4]


def test_keywords_are_the_most_frequent_words_without_stop_words():
    samples = [sample(1, [1], "What is the capital of Zorbania?"), sample(2, [1], "The capital of Brindor")]
    assert keywords_of(samples, 2) == ["capital", "brindor"]
