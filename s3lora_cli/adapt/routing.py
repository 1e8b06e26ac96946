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
from s3lora_cli.adapt.buffer import unit
from s3lora_cli.adapt.embedding import Embedder
from s3lora_cli.adapt.policy import StorePolicy
from s3lora_cli.errors import AdapterInputError

DEFAULT_ROUTE_THRESHOLD = StorePolicy.route_threshold
"""Least cosine between a prompt and a cluster's prompt centre for the cluster's adapter to answer it."""


@dataclass(frozen=True)
class StoredCluster:
    """An admitted adapter and the cluster it serves (its ``s3lora-cluster.json``); ``centre`` is the cluster's
    prompt centre and ``base_centre`` (None when unknown) the centre of the prompts the base model answered,
    both in the frame centred on ``origin``."""

    entry: Path
    run: str
    cluster: int
    generation: int
    keywords: tuple[str, ...]
    centre: np.ndarray
    origin: np.ndarray
    embedder: str
    record: dict[str, Any]
    base_centre: np.ndarray | None = None

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
            item = StoredCluster(
                entry=entry,
                run=str(doc["run"]),
                cluster=int(doc["cluster"]),
                generation=int(doc["generation"]),
                keywords=tuple(map(str, doc["keywords"])),
                centre=np.asarray(doc["prompt_centre"], dtype=np.float64),
                origin=np.asarray(doc["origin"], dtype=np.float64),
                embedder=str(doc["embedder"]),
                record=doc,
                base_centre=None
                if doc.get("base_centre") is None
                else np.asarray(doc["base_centre"], dtype=np.float64),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterInputError(f"{entry / CLUSTER_RECORD_NAME}: corrupt cluster record ({exc})") from None
        key = (item.run, item.cluster)
        if key not in latest or item.generation > latest[key].generation:
            latest[key] = item
    return sorted(latest.values(), key=lambda c: c.name)


def route_score(vector: np.ndarray, cluster: StoredCluster) -> tuple[float, bool]:
    """The cosine of the prompt's vector (centred on the cluster's origin) with the cluster's prompt centre, and
    whether it is closer to that centre than to the centre of the prompts the base model answered (True when
    the record has no such centre): a nearest-centroid choice between the adapter and the base model."""
    x = unit(np.asarray(vector, dtype=np.float64) - cluster.origin)
    cosine = float(x @ cluster.centre)
    return cosine, cluster.base_centre is None or cosine > float(x @ cluster.base_centre)


class Router:
    """Routes prompts among ``clusters`` and answers them. The base model given is never modified: adapters
    are loaded, once each, onto one PEFT model built on a copy of it."""

    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        embed: Embedder,
        clusters: Sequence[StoredCluster] = (),
        threshold: float = DEFAULT_ROUTE_THRESHOLD,
    ):
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.embed = embed
        self.threshold = threshold
        self.clusters: list[StoredCluster] = list(clusters)
        self._peft: Any = None
        self._loaded: set[str] = set()

    def reload(self, store: Path) -> None:
        """Take the store's clusters as they are now (adapters already loaded stay cached)."""
        self.clusters = stored_clusters(store)

    def route(self, prompts: Sequence[str], vectors: np.ndarray | None = None) -> list[Route]:
        """The route of each prompt (``vectors``: their embeddings, when already computed): the cluster with
        the highest cosine, when that reaches the threshold and beats the base model's centre; else the base."""
        if not self.clusters or not prompts:
            return [Route(None, float("-inf"), None) for _ in prompts]
        vectors = self.embed(list(prompts)) if vectors is None else vectors
        routes = []
        for vector in vectors:
            scored = [(*route_score(vector, c), c) for c in self.clusters]
            cosine, nearer, best = max(scored, key=lambda item: item[0])
            routes.append(Route(best if cosine >= self.threshold and nearer else None, cosine, best))
        return routes

    def _model_for(self, cluster: StoredCluster) -> Any:
        from peft import PeftModel

        name = cluster.name
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    copy.deepcopy(self.base_model), str(cluster.entry), adapter_name=name, is_trainable=False
                )
            elif name not in self._loaded:
                self._peft.load_adapter(str(cluster.entry), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError, OSError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AdapterInputError(
                f"{cluster.entry}: PEFT cannot load this adapter onto the base model: {first}"
            ) from exc
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

    def answer(
        self, prompts: Sequence[str], max_new_tokens: int, routes: Sequence[Route] | None = None, batch_size: int = 8
    ) -> list[tuple[Route, Any]]:
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
                    chunk = members[start : start + batch_size]
                    for i, g in zip(
                        chunk,
                        generate_answers(model, self.tokenizer, [prompts[i] for i in chunk], max_new_tokens),
                        strict=True,
                    ):
                        answers[i] = g
        return list(zip(routes, answers, strict=True))
