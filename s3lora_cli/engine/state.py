"""What one greedy fit keeps between its steps: everything that depends on the candidates alone (which do not
change from step to step), computed once on first use."""

from __future__ import annotations

import torch

from s3lora_cli.engine import exact
from s3lora_cli.engine.bounds import BoundTerms


class FitState:
    """The state of one fit over the candidates us: [d, Mu] and vs: [k, Mv]: its random generator; for each
    candidate the ``sample_size`` rows (or columns) drawn with probability proportional to |u_i| (or |v_j|), drawn
    once and used at every step (``weighted``); and what the dual bounds take from the candidates alone
    (``bound_terms``, ``w_all``)."""

    def __init__(self, us: torch.Tensor, vs: torch.Tensor, seed: int) -> None:
        self.vs = vs
        self.gen = torch.Generator(device=us.device)
        self.gen.manual_seed(seed)
        self._weighted: dict = {}
        self.sample_size = exact.sample_size(us.shape[0] * vs.shape[0])
        """Draws per candidate, sized by the layer (``exact.sample_size``)."""
        self._us64, self._vs64 = us.to(torch.float64), vs.to(torch.float64)
        self.w_all = self._us64.abs().sum(0)[:, None] * self._vs64.abs().sum(0)[None, :]
        """[Mu, Mv]: sum_ij |u_i v_j| = ||u||_1 ||v||_1 of every pair."""
        self._bound_terms: dict = {}

    def bound_terms(self, alpha: int) -> BoundTerms:
        if alpha not in self._bound_terms:
            self._bound_terms[alpha] = BoundTerms.of(self._us64, self._vs64, alpha)
        return self._bound_terms[alpha]

    def weighted(self, side: str, candidates: torch.Tensor, index: int) -> torch.Tensor:
        if (side, index) not in self._weighted:
            self._weighted[side, index] = exact.weighted_indices(candidates[:, index], self.sample_size, self.gen)
        return self._weighted[side, index]

    def all_weighted(self, side: str, candidates: torch.Tensor) -> torch.Tensor:
        """[M, sample_size]: the draws of every candidate on one side."""
        if (side, "all") not in self._weighted:
            self._weighted[side, "all"] = torch.stack(
                [self.weighted(side, candidates, index) for index in range(candidates.shape[1])]
            )
        return self._weighted[side, "all"]
