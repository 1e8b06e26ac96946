"""Routing: the clusters the store's adapters serve, and the choice, for a new prompt, of the adapter whose
cluster it falls in (or the base model), with the adapters loaded once onto one PEFT model and cached."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s3lora_cli.adapt.admission import CLUSTER_RECORD_NAME
from s3lora_cli.adapt.buffer import unit, words
from s3lora_cli.adapt.embedding import Embedder
from s3lora_cli.errors import AdapterInputError

DEFAULT_ROUTE_THRESHOLD = 0.6
DEFAULT_ROUTE_WEIGHT_COSINE = 0.7
"""As the buffer assigns a sample to a stored cluster: 0.7 cosine + 0.3 keyword overlap, at least 0.6."""


@dataclass(frozen=True)
class StoredCluster:
    """An admitted adapter and the cluster it serves (its ``s3lora-cluster.json``); ``centre`` is the cluster's
    prompt centre, in the frame centred on ``origin``."""

    entry: Path
    run: str
    cluster: int
    generation: int
    keywords: tuple[str, ...]
    centre: np.ndarray
    origin: np.ndarray
    embedder: str
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass(frozen=True)
class Route:
    """Where a prompt goes: ``cluster`` (None: the base model), the best score and the cluster that had it."""

    cluster: StoredCluster | None
    score: float
    nearest: StoredCluster | None

    @property
    def used(self) -> str:
        return "base" if self.cluster is None else self.cluster.name


def read_record(entry: Path) -> dict[str, Any] | None:
    """The cluster record of a store entry, None when it has none; AdapterInputError when it is corrupt."""
    path = Path(entry) / CLUSTER_RECORD_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterInputError(f"{path}: corrupt cluster record ({exc})") from None


def stored_clusters(store: Path) -> list[StoredCluster]:
    """The store's adapters that serve a cluster, the latest generation of each (run, cluster), by name.
    Entries without a cluster record (adapters admitted by hand) are not routed to."""
    store = Path(store)
    if not store.is_dir():
        return []
    latest: dict[tuple[str, int], StoredCluster] = {}
    for entry in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        doc = read_record(entry)
        if doc is None or doc.get("prompt_centre") is None or doc.get("origin") is None:
            continue
        try:
            item = StoredCluster(entry=entry, run=str(doc["run"]), cluster=int(doc["cluster"]),
                                 generation=int(doc["generation"]), keywords=tuple(map(str, doc["keywords"])),
                                 centre=np.asarray(doc["prompt_centre"], dtype=np.float64),
                                 origin=np.asarray(doc["origin"], dtype=np.float64), embedder=str(doc["embedder"]),
                                 record=doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterInputError(f"{entry / CLUSTER_RECORD_NAME}: corrupt cluster record ({exc})") from None
        key = (item.run, item.cluster)
        if key not in latest or item.generation > latest[key].generation:
            latest[key] = item
    return sorted(latest.values(), key=lambda c: c.name)


def route_score(vector: np.ndarray, prompt: str, cluster: StoredCluster, weight_cosine: float) -> float:
    """weight_cosine * cosine(centred prompt vector, cluster centre) + (1 - weight_cosine) * the share of the
    cluster's keywords among the prompt's words (the buffer's assignment score)."""
    x = unit(np.asarray(vector, dtype=np.float64) - cluster.origin)
    overlap = len(words(prompt) & set(cluster.keywords)) / len(cluster.keywords) if cluster.keywords else 0.0
    return weight_cosine * float(x @ cluster.centre) + (1 - weight_cosine) * overlap


class Router:
    """Routes prompts among ``clusters`` and answers them. The base model given is never modified: adapters
    are loaded, once each, onto one PEFT model built on a copy of it."""

    def __init__(self, base_model: Any, tokenizer: Any, embed: Embedder, clusters: Sequence[StoredCluster] = (),
                 threshold: float = DEFAULT_ROUTE_THRESHOLD, weight_cosine: float = DEFAULT_ROUTE_WEIGHT_COSINE):
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.embed = embed
        self.threshold = threshold
        self.weight_cosine = weight_cosine
        self.clusters: list[StoredCluster] = list(clusters)
        self._peft: Any = None
        self._loaded: set[str] = set()

    def reload(self, store: Path) -> None:
        """Take the store's clusters as they are now (adapters already loaded stay cached)."""
        self.clusters = stored_clusters(store)

    def route(self, prompts: Sequence[str]) -> list[Route]:
        """The route of each prompt: the best-scoring cluster when its score reaches the threshold."""
        if not self.clusters or not prompts:
            return [Route(None, float("-inf"), None) for _ in prompts]
        vectors = self.embed(list(prompts))
        routes = []
        for prompt, vector in zip(prompts, vectors, strict=True):
            scored = [(route_score(vector, prompt, c, self.weight_cosine), c) for c in self.clusters]
            score, best = max(scored, key=lambda item: item[0])
            routes.append(Route(best if score >= self.threshold else None, score, best))
        return routes

    def _model_for(self, cluster: StoredCluster) -> Any:
        from peft import PeftModel

        name = cluster.name
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(copy.deepcopy(self.base_model), str(cluster.entry),
                                                       adapter_name=name, is_trainable=False)
            elif name not in self._loaded:
                self._peft.load_adapter(str(cluster.entry), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError, OSError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AdapterInputError(f"{cluster.entry}: PEFT cannot load this adapter onto the base model: "
                                    f"{first}") from exc
        self._loaded.add(name)
        self._peft.set_adapter(name)
        self._peft.eval()
        return self._peft

    @contextmanager
    def using(self, route: Route):
        """The model that answers ``route``: the base model, or the PEFT model with the cluster's adapter set."""
        if route.cluster is None:
            yield self.base_model
            return
        yield self._model_for(route.cluster)

    def answer(self, prompts: Sequence[str], max_new_tokens: int, routes: Sequence[Route] | None = None,
               batch_size: int = 8) -> list[tuple[Route, Any]]:
        """Greedy answers (trigger.Generation) of ``prompts``, each by the model of its route, in prompt order."""
        from s3lora_cli.adapt.trigger import generate_answers

        routes = list(routes) if routes is not None else self.route(prompts)
        answers: list[Any] = [None] * len(prompts)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(routes):
            groups.setdefault(r.used, []).append(i)
        for _, members in sorted(groups.items()):
            with self.using(routes[members[0]]) as model:
                for start in range(0, len(members), batch_size):
                    chunk = members[start:start + batch_size]
                    for i, g in zip(chunk, generate_answers(model, self.tokenizer, [prompts[i] for i in chunk],
                                                            max_new_tokens), strict=True):
                        answers[i] = g
        return list(zip(routes, answers, strict=True))
