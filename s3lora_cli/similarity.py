"""Similarity of LoRA weight updates computed from their small factors, never from the d x k matrices.

For one module, dW1 = L1 @ R1 and dW2 = L2 @ R2 (L: [d, r], R: [r, k], scaling folded into L):

    <dW1, dW2>_F = trace((L1^T L2) (R2 R1^T)) = sum((L1^T L2) * (R1 R2^T)),   ||dW||_F^2 = <dW, dW>_F,

which costs O(r1 r2 (d + k)) instead of O(d k). Two adapters are compared over their shared modules (same module
path and the same dW shape), and the per-module cosines are aggregated by a norm-weighted mean:

    similarity = sum_m ||dW1_m|| ||dW2_m|| cos_m / sum_m ||dW1_m|| ||dW2_m||
               = sum_m <dW1_m, dW2_m> / sum_m ||dW1_m|| ||dW2_m||,

which lies in [-1, 1] (Cauchy-Schwarz per module), is 1 for identical updates and -1 for negated ones, and weighs
each module by how much both adapters change it. With no shared module of non-zero norm it is undefined (NaN).

Many adapters at once: for each module the factors of a block of adapters are stacked side by side and the two
Gram matrices of the stacked factors, multiplied elementwise, hold every pairwise trace above; summing their
r1 x r2 blocks gives all pairwise inner products with a few matrix products, in memory bounded by the block sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

Factors = tuple[torch.Tensor, torch.Tensor]
"""(L [d, r], R [r, k]) with dW = L @ R."""


def update_inner(left1: torch.Tensor, right1: torch.Tensor, left2: torch.Tensor, right2: torch.Tensor) -> torch.Tensor:
    """<L1 R1, L2 R2>_F from the factors: sum((L1^T L2) * (R1 R2^T)). Ranks may differ; d and k must agree."""
    return ((left1.T @ left2) * (right1 @ right2.T)).sum()


def update_norm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """||L R||_F from the factors (clamped at 0 against rounding)."""
    return update_inner(left, right, left, right).clamp_min(0.0).sqrt()


@dataclass(frozen=True)
class UpdateSet:
    """The LoRA updates of one adapter by module path: {module: (L [d, r], R [r, k])}, dW = L @ R, scaling
    included. Only finite factors belong here; a reader leaves out layers it cannot use."""

    modules: Mapping[str, Factors]

    def key(self, module: str) -> tuple[str, int, int]:
        left, right = self.modules[module]
        return module, left.shape[0], right.shape[1]


@dataclass(frozen=True)
class PairwiseSimilarity:
    """All pairwise similarities of ``queries`` against ``keys``.

    cosine: [Q, K] the norm-weighted mean cosine (NaN where undefined: no shared module of non-zero norm).
    inner: [Q, K] sum over shared modules of <dW_q, dW_k>_F. weight: [Q, K] sum over them of ||dW_q|| ||dW_k||.
    shared: [Q, K] the number of shared modules (same path, same dW shape).
    """

    cosine: torch.Tensor
    inner: torch.Tensor
    weight: torch.Tensor
    shared: torch.Tensor


def _stack(sets: Sequence[UpdateSet], key: tuple[str, int, int], dtype: torch.dtype):
    """The factors of every set holding ``key``, side by side: (L [d, sum r], R^T [k, sum r], owner [sum r],
    norms [n], present [n])."""
    members = [i for i, s in enumerate(sets) if key[0] in s.modules and s.key(key[0]) == key]
    if not members:
        return None
    lefts = [sets[i].modules[key[0]][0].to(dtype) for i in members]
    rights = [sets[i].modules[key[0]][1].to(dtype) for i in members]
    owner = torch.cat(
        [torch.full((left.shape[1],), i, dtype=torch.long) for i, left in zip(members, lefts, strict=True)]
    )
    norms = torch.zeros(len(sets), dtype=dtype)
    present = torch.zeros(len(sets), dtype=torch.bool)
    present[members] = True
    by_rank: dict[int, list[int]] = {}
    for pos, left in enumerate(lefts):
        by_rank.setdefault(left.shape[1], []).append(pos)
    for positions in by_rank.values():  # ||dW||^2 = sum((L^T L) * (R R^T)), batched over the sets of one rank
        left = torch.stack([lefts[p] for p in positions])
        right = torch.stack([rights[p] for p in positions])
        squared = ((left.transpose(1, 2) @ left) * (right @ right.transpose(1, 2))).sum(dim=(1, 2))
        norms[[members[p] for p in positions]] = squared.clamp_min(0.0).sqrt()
    return torch.cat(lefts, dim=1), torch.cat([r.T for r in rights], dim=1), owner, norms, present


def _block_sums(gram: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """out[i, j] = sum of gram over the rows owned by i and the columns owned by j."""
    by_row = torch.zeros(n_rows, gram.shape[1], dtype=gram.dtype).index_add_(0, rows, gram)
    return torch.zeros(n_rows, n_cols, dtype=gram.dtype).index_add_(1, cols, by_row)


def pairwise_similarity(
    queries: Sequence[UpdateSet], keys: Sequence[UpdateSet], dtype: torch.dtype = torch.float64
) -> PairwiseSimilarity:
    """Similarity of every query against every key (the definition is in this module's docstring).

    Per shared module: Gram_L = L_q^T L_k ([sum r_q, sum r_k]) and Gram_R = R_q R_k^T, and
    <dW_q, dW_k> = the (q, k) block sum of Gram_L * Gram_R. Memory: O((sum r_q) (sum r_k)) per module.
    """
    nq, nk = len(queries), len(keys)
    inner = torch.zeros(nq, nk, dtype=dtype)
    weight = torch.zeros(nq, nk, dtype=dtype)
    shared = torch.zeros(nq, nk, dtype=torch.long)
    query_keys = {s.key(m) for s in queries for m in s.modules}
    key_keys = {s.key(m) for s in keys for m in s.modules}
    for key in sorted(query_keys & key_keys):
        q, k = _stack(queries, key, dtype), _stack(keys, key, dtype)
        if q is None or k is None:
            continue
        lq, rq, oq, nq_norm, pq = q
        lk, rk, ok, nk_norm, pk = k
        gram = (lq.T @ lk) * (rq.T @ rk)
        inner += _block_sums(gram, oq, ok, nq, nk)
        weight += torch.outer(nq_norm, nk_norm)
        shared += torch.outer(pq.long(), pk.long())
    cosine = torch.where(
        weight > 0,
        inner / torch.where(weight > 0, weight, torch.ones_like(weight)),
        torch.full_like(weight, float("nan")),
    )
    return PairwiseSimilarity(cosine.clamp(-1.0, 1.0), inner, weight, shared)


def similarity(a: UpdateSet, b: UpdateSet) -> float:
    """The norm-weighted mean cosine of two adapters' updates over their shared modules (NaN if undefined)."""
    return float(pairwise_similarity([a], [b]).cosine[0, 0])
