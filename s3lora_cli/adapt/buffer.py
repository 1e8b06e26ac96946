"""The Trigger Buffer: triggered samples collected per bucket, re-clustered with HDBSCAN until two labelings in a
row agree (adjusted Rand index and optimally matched centres), then stored as clusters that later samples join
online, that merge when their centres meet, and that are handed off once large enough."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from s3lora_cli.adapt.policy import BufferPolicy

NOISE = -1
STOPWORDS = frozenset(
    "a an and are as at be by can did do does for from has have how i in is it its me of on or s that the this "
    "to was what when where which who whom why will with you your".split()
)


@dataclass
class Sample:
    """A triggered sample. line: its line in the triggered stream; text: what is embedded (prompt and gold
    answer); record: the trigger's task record, handed off verbatim; embedding: raw, as the embedder gave it."""

    line: int
    text: str
    record: dict[str, Any]
    embedding: np.ndarray


@dataclass
class Cluster:
    """A stored cluster. centre: unit mean of its members' centred unit vectors; keywords: its most frequent
    words; handed_off: whether its JSONL file has been written."""

    id: int
    bucket: str
    members: list[Sample]
    centre: np.ndarray
    keywords: list[str]
    handed_off: bool = False


@dataclass
class Bucket:
    """The unclustered samples of one bucket, the previous labeling over its first samples (None after a
    flush), and the origin its vectors are centred on (fixed when it first becomes stable)."""

    samples: list[Sample] = field(default_factory=list)
    previous: list[int] | None = None
    origin: np.ndarray | None = None


@dataclass(frozen=True)
class Stability:
    """The comparison of two labelings over the same samples: their adjusted Rand index and the least cosine of
    centres matched by optimal assignment (-1 when either labeling has no cluster)."""

    ari: float
    centre_cosine: float
    stable: bool


@dataclass
class BufferState:
    """Everything the Trigger Buffer knows; the state module writes and reads it."""

    buckets: dict[str, Bucket] = field(default_factory=dict)
    clusters: list[Cluster] = field(default_factory=list)
    next_cluster_id: int = 1
    reclusterings: int = 0
    stabilisations: list[dict[str, int]] = field(default_factory=list)
    embedder: str = ""


def words(text: str) -> set[str]:
    """The lower-case words of ``text``, without stop words."""
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS}


def keywords_of(samples: Sequence[Sample], count: int) -> list[str]:
    """The ``count`` words found in most of ``samples`` (ties by the word)."""
    frequency = Counter(w for s in samples for w in words(s.text))
    return [w for w, _ in sorted(frequency.items(), key=lambda item: (-item[1], item[0]))[:count]]


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero). vectors: [n, d] or [d]."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


def centred(samples: Sequence[Sample], origin: np.ndarray) -> np.ndarray:
    """The samples' unit vectors after subtracting ``origin``: [n, d]. A decoder's hidden states share a large
    common component (all cosines near 0.9); without it, cosines tell topics apart."""
    return unit(np.stack([s.embedding for s in samples]).astype(np.float64) - origin)


def cluster_labels(vectors: np.ndarray, policy: BufferPolicy) -> list[int]:
    """HDBSCAN (scikit-learn) labels of unit ``vectors`` [n, d] (Euclidean, a monotone function of cosine);
    -1 is noise."""
    from sklearn.cluster import HDBSCAN

    if len(vectors) < policy.min_cluster_size:
        return [NOISE] * len(vectors)
    model = HDBSCAN(
        min_cluster_size=policy.min_cluster_size, cluster_selection_method=policy.cluster_selection, copy=True
    )
    return [int(x) for x in model.fit_predict(vectors)]


def label_centres(vectors: np.ndarray, labels: Sequence[int]) -> dict[int, np.ndarray]:
    """Unit mean vector of each label other than noise."""
    array = np.asarray(labels)
    return {int(k): unit(vectors[array == k].mean(axis=0)) for k in sorted(set(array.tolist()) - {NOISE})}


def compare_labelings(
    previous: Sequence[int], current: Sequence[int], vectors: np.ndarray, policy: BufferPolicy
) -> Stability:
    """Stability of two labelings of the same samples (``vectors`` [n, d], centred unit vectors): ARI, and the
    least cosine between centres paired by optimal assignment (scipy's linear_sum_assignment on the cosines,
    never by label number)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score

    ari = float(adjusted_rand_score(previous, current))
    old, new = label_centres(vectors, previous), label_centres(vectors, current)
    if not old or not new:
        return Stability(ari=ari, centre_cosine=-1.0, stable=False)
    cosines = np.stack(list(old.values())) @ np.stack(list(new.values())).T
    rows, cols = linear_sum_assignment(cosines, maximize=True)
    least = float(cosines[rows, cols].min())
    return Stability(
        ari=ari, centre_cosine=least, stable=ari >= policy.stable_ari and least >= policy.stable_centre_cosine
    )


class TriggerBuffer:
    """The streaming buffer over a BufferState. ``add`` takes one embedded sample and returns what changed;
    it never writes files (the state module does)."""

    def __init__(self, state: BufferState, policy: BufferPolicy):
        self.state = state
        self.policy = policy

    def add(self, sample: Sample, bucket_key: str) -> dict[str, Any]:
        """Route ``sample``: to the best stored cluster of its bucket when 0.7 cosine + 0.3 keyword overlap
        reaches the threshold, else into the bucket's buffer (re-clustered once it holds min_buffer samples).
        Returns {"assigned": id or None, "reclustered": bool, "stability": Stability or None, "formed": ids}."""
        bucket = self.state.buckets.setdefault(bucket_key, Bucket())
        event: dict[str, Any] = {"assigned": None, "reclustered": False, "stability": None, "formed": []}
        target = self._best_cluster(sample, bucket_key, bucket)
        if target is not None:
            assert bucket.origin is not None  # a bucket has clusters only once its origin is fixed
            target.members.append(sample)
            self._refresh(target, bucket.origin)
            event["assigned"] = target.id
            self._merge(bucket_key, bucket.origin)
            return event
        bucket.samples.append(sample)
        if len(bucket.samples) >= self.policy.min_buffer:
            event.update(self._recluster(sample.line, bucket_key, bucket))
        return event

    def _best_cluster(self, sample: Sample, bucket_key: str, bucket: Bucket) -> Cluster | None:
        candidates = [c for c in self.state.clusters if c.bucket == bucket_key]
        if not candidates or bucket.origin is None:
            return None
        x = centred([sample], bucket.origin)[0]
        sample_words = words(sample.text)
        w = self.policy.assign_weight_cosine
        scored = []
        for c in candidates:
            overlap = len(sample_words & set(c.keywords)) / len(c.keywords) if c.keywords else 0.0
            scored.append((w * float(x @ c.centre) + (1 - w) * overlap, -c.id, c))
        best_score, _, best = max(scored, key=lambda item: item[:2])
        return best if best_score >= self.policy.assign_threshold else None

    def _recluster(self, line: int, bucket_key: str, bucket: Bucket) -> dict[str, Any]:
        origin = (
            bucket.origin
            if bucket.origin is not None
            else np.stack([s.embedding for s in bucket.samples]).astype(np.float64).mean(axis=0)
        )
        vectors = centred(bucket.samples, origin)
        labels = cluster_labels(vectors, self.policy)
        self.state.reclusterings += 1
        previous, bucket.previous = bucket.previous, labels
        if previous is None:
            return {"reclustered": True}
        stability = compare_labelings(previous, labels[: len(previous)], vectors[: len(previous)], self.policy)
        if not stability.stable:
            return {"reclustered": True, "stability": stability}
        bucket.origin = origin
        formed = []
        for label in sorted(set(labels) - {NOISE}):
            members = [s for s, k in zip(bucket.samples, labels, strict=True) if k == label]
            cluster = Cluster(
                id=self.state.next_cluster_id, bucket=bucket_key, members=members, centre=np.zeros(0), keywords=[]
            )
            self.state.next_cluster_id += 1
            self._refresh(cluster, origin)
            self.state.clusters.append(cluster)
            formed.append(cluster.id)
        # Flush: the clustered samples leave the buffer and the stability check starts afresh.
        bucket.samples = [s for s, k in zip(bucket.samples, labels, strict=True) if k == NOISE]
        bucket.previous = None
        self.state.stabilisations.append({"line": line, "reclusterings": self.state.reclusterings})
        self._merge(bucket_key, origin)
        return {"reclustered": True, "stability": stability, "formed": formed}

    def _refresh(self, cluster: Cluster, origin: np.ndarray) -> None:
        cluster.members.sort(key=lambda s: s.line)
        cluster.centre = unit(centred(cluster.members, origin).mean(axis=0))
        cluster.keywords = keywords_of(cluster.members, self.policy.keywords)

    def _merge(self, bucket_key: str, origin: np.ndarray) -> None:
        """Merge the closest pair of the bucket's clusters while their centres' cosine is >= merge_cosine; the
        lower id survives."""
        while True:
            clusters = sorted((c for c in self.state.clusters if c.bucket == bucket_key), key=lambda c: c.id)
            best = None
            for i, a in enumerate(clusters):
                for b in clusters[i + 1 :]:
                    cos = float(a.centre @ b.centre)
                    if cos >= self.policy.merge_cosine and (best is None or cos > best[0]):
                        best = (cos, a, b)
            if best is None:
                return
            _, keep, gone = best
            keep.members.extend(gone.members)
            self._refresh(keep, origin)
            self.state.clusters.remove(gone)

    def ready(self) -> list[Cluster]:
        """The clusters large enough to hand off (at least min_cluster members), by id."""
        return sorted((c for c in self.state.clusters if len(c.members) >= self.policy.min_cluster), key=lambda c: c.id)
