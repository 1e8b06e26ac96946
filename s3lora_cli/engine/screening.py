"""Certified screening of one step of the greedy fit: the exact objectives of the pairs that no certified lower
bound rules out; every other pair provably cannot win, so the pick is that of the exhaustive step.

1. The first pass (``FirstPass``): the pair with the best estimate (on a sample) is evaluated exactly, in a
   pass that also gives every pair's dual bound (``bounds``) and the first tangents of the next best-estimated
   pairs (``early_pairs``). At near ties (see NEAR_TIE_GAIN) the estimates cannot tell the pairs apart, but the
   dual bounds can (measured: the pair with the lowest bound is the best pair, or one of the few next to it;
   the estimate's pair often gained nothing, and then no bound ruled out a pair): the pair evaluated with the
   bounds is the one the previous step's bounds favour (``Screened.favoured``); at the first near tie of a fit
   the bounds come first, in a pass of their own, and the pair with the lowest bound is evaluated next.
2. The pairs whose dual bound does not exceed the best objective so far get tangent bounds and upper bounds
   (``tangents``) from cheaper passes that form no ratio (``TangentRounds``): first at the ends of a bracket
   sampled with weights |u_i v_j| (``exact.brackets``), then (up to TANGENT_ROUNDS times) in a bracket narrowed
   around the minimum, as long as that rules out pairs. After the first round the pair with the best upper
   bound is evaluated, if it can beat the best objective.
3. The pairs left are evaluated.
Bounds within BOUND_SLACK (relative) of the best count as not exceeding it. Estimates and brackets decide only
the order of the work, never the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s3lora_cli.engine import exact, tangents
from s3lora_cli.engine.bounds import BOUND_POWERS, DualBounds, DualSums
from s3lora_cli.engine.residual import Residual, read_pass
from s3lora_cli.engine.state import FitState
from s3lora_cli.engine.tangents import Tangent, TangentPass, envelope_bounds, far_end, narrowed, points, zero_tangent

Pair = tuple[int, int]

NEAR_TIE_GAIN = 0.02
"""Steps whose best estimated gain (||R||_1 minus the objective) is below this fraction of ||R||_1 are near ties:
there the screening takes the dual bounds of every alpha in BOUND_POWERS (alpha = 2 rules out pairs that
alpha = 0 leaves) before any exact pair; at the other steps alpha = 0 alone rules out as many (measured on
the generated adapters), in a third of the sums."""

ESTIMATE_SAMPLE = 1 << 12
"""Entries drawn uniformly to estimate every pair's objective, which orders the exact work, at most: a layer
draws one per ESTIMATE_SPARSITY of its entries, at least ESTIMATE_MIN (sized by the layer as the brackets are,
``exact.sample_size``)."""

ESTIMATE_MIN = 1 << 9
"""Entries drawn for the estimates, at least."""

ESTIMATE_SPARSITY = 1 << 10
"""Between ESTIMATE_MIN and ESTIMATE_SAMPLE, one entry drawn for the estimates per this many of a layer."""

BRACKET_Z = 3.0
"""Half-width, in standard deviations of the sample median's rank, of the bracket where a pair's first
tangent bounds are taken."""

EARLY_GAIN = 0.05
"""An early pair (``early_pairs``) has an estimated gain of at least this fraction of the first pair's."""

EARLY_PAIRS = 8
"""At most this many early pairs (``early_pairs``)."""

TANGENT_ROUNDS = 4
"""Passes of tangent bounds per step at most."""

TANGENT_MIN_GAIN = 0.25
"""Tangent rounds stop once a round rules out fewer than this fraction of the pairs left."""

BOUND_SLACK = 1e-6
"""A bound within this relative margin of the best objective counts as not exceeding it (the pair is evaluated)."""

TINY = 1e-300
"""Added to every slack, so that a best objective of 0 still leaves room for an equal bound."""


@dataclass(frozen=True)
class Screened:
    """The result of a screened step: ``evaluated`` (pair -> exact (delta, objective)) holds the winner; and the pair
    with the lowest dual bound other than the winner (``favoured``). At near ties a pick changes R little, and
    this is the next step's best pair, or one of the few next to it, as often as the pair its own bounds favour
    (measured): the next near-tie step evaluates it in the pass of its bounds."""

    evaluated: dict
    favoured: Pair | None


def screened_step(res: Residual, us, vs, pairs: list[Pair], state, favoured: Pair | None) -> Screened:
    """Exact objectives of the pairs that the certified lower bounds cannot rule out (the module docstring)."""
    first = FirstPass.run(res, us, vs, pairs, state, favoured)
    rounds = TangentRounds(res, us, vs, state, first)
    rest = rounds.run(
        [
            pair
            for pair in pairs
            if pair not in first.evaluated and first.bound_of[pair[0]][pair[1]] <= _ceiling(rounds.best())
        ]
    )
    if rest:
        rounds.evaluated.update(exact.exact_pairs(res, us, vs, rest, state))
    evaluated = rounds.evaluated
    picked = min(evaluated, key=lambda pair: (evaluated[pair][1], pair))
    following = min(
        (pair for pair in pairs if pair != picked),
        default=None,
        key=lambda pair: (first.bound_of[pair[0]][pair[1]], pair),
    )
    return Screened(evaluated, following)


def _ceiling(value: float) -> float:
    """The largest bound that does not rule a pair out against ``value``."""
    return value + (BOUND_SLACK * abs(value) + TINY)


@dataclass(frozen=True)
class FirstPass:
    """What the first pass of a step found: the pair(s) evaluated exactly, every pair's dual bounds, the sampled
    brackets of the early pairs and their first tangents."""

    evaluated: dict
    bounds: DualBounds
    brackets: dict
    early: dict

    @property
    def bound_of(self) -> list:
        return self.bounds.lower.tolist()

    @classmethod
    def run(cls, res: Residual, us, vs, pairs: list[Pair], state, favoured: Pair | None) -> FirstPass:
        estimates, sample_l1 = sample_objectives(res.p, res.q, us, vs, state.gen)
        estimated = estimates.tolist()
        best_estimated = min(pairs, key=lambda pair: (estimated[pair[0]][pair[1]], pair))
        if sample_l1 - float(estimates.min()) < NEAR_TIE_GAIN * sample_l1:
            return cls._near_tie(res, us, vs, pairs, state, favoured)
        early = early_pairs(estimates, sample_l1, best_estimated)
        brackets = exact.brackets(res.p, res.q, us, vs, dict.fromkeys(early, BRACKET_Z), state)
        probes = TangentPass(us, vs, early, {pair: far_end(brackets[pair]) for pair in early}) if early else None
        sums = DualSums(vs, BOUND_POWERS[:1])
        evaluated = exact.exact_pairs(
            res, us, vs, [best_estimated], state, riders=(sums, probes) if probes is not None else (sums,)
        )
        bounds = DualBounds.of(sums.finish(state), res.p, res.q, state)
        return cls(evaluated, bounds, brackets, probes.finish() if probes is not None else {})

    @classmethod
    def _near_tie(cls, res: Residual, us, vs, pairs: list[Pair], state, favoured: Pair | None) -> FirstPass:
        """Every power's bounds; with the favoured pair in the same pass, or first, then the pair they favour."""
        sums = DualSums(vs, BOUND_POWERS)
        if favoured in pairs:
            evaluated = exact.exact_pairs(res, us, vs, [favoured], state, riders=(sums,))
            return cls(evaluated, DualBounds.of(sums.finish(state), res.p, res.q, state), {}, {})
        exact.exact_pairs(res, us, vs, [], state, riders=(sums,))
        bounds = DualBounds.of(sums.finish(state), res.p, res.q, state)
        lowest = bounds.lower.tolist()
        first = min(pairs, key=lambda pair: (lowest[pair[0]][pair[1]], pair))
        return cls(exact.exact_pairs(res, us, vs, [first], state), bounds, {}, {})


class TangentRounds:
    """Step 2 of the module docstring: rounds of tangents for the pairs the dual bounds leave."""

    def __init__(self, res: Residual, us, vs, state, first: FirstPass) -> None:
        self.res, self.us, self.vs, self.state = res, us, vs, state
        self.sums = first.bounds.sums
        self.evaluated = dict(first.evaluated)
        self.brackets = dict(first.brackets)
        self.early = first.early
        self.tangents: dict[Pair, list[Tangent]] = {}

    def best(self) -> float:
        return min(obj for _, obj in self.evaluated.values())

    def with_zero(self, pair: Pair) -> list[Tangent]:
        """A pair's tangents and the one at 0 (free, from the dual sums), its rounding over the span of the others."""
        found = self.tangents[pair]
        return [*found, zero_tangent(self.sums, pair, max((abs(t.theta) for t in found), default=0.0))]

    def run(self, rest: list[Pair]) -> list[Pair]:
        """The pairs that the tangents cannot rule out (some may be evaluated on the way)."""
        missing = {pair: BRACKET_Z for pair in rest if pair not in self.brackets}
        self.brackets.update(exact.brackets(self.res.p, self.res.q, self.us, self.vs, missing, self.state))
        self.tangents = {pair: self.early.get(pair, []) for pair in rest}
        for round_ in range(TANGENT_ROUNDS):
            if not rest:
                break
            before = len(rest)
            rest, envelopes = self._round(round_, rest)
            if round_ > 0 and len(rest) > before * (1 - TANGENT_MIN_GAIN):
                break
            self.brackets = {pair: narrowed(self.with_zero(pair), envelopes[pair].bracket) for pair in rest}
        return rest

    def _round(self, round_: int, rest: list[Pair]) -> tuple[list[Pair], dict]:
        # the early pairs' first tangents came with the dual sums
        where = {
            pair: () if round_ == 0 and self.tangents[pair] else points(self.brackets[pair], self.with_zero(pair)[-1])
            for pair in rest
        }
        probed = [pair for pair in rest if where[pair]]
        for pair, found in (tangents.tangents(self.res, self.us, self.vs, probed, where) if probed else {}).items():
            self.tangents[pair] += found
        envelopes = {pair: envelope_bounds(self.with_zero(pair)) for pair in rest}
        ceiling = min(self.best(), *(envelope.upper for envelope in envelopes.values()))
        rest = sorted(
            (pair for pair in rest if envelopes[pair].lower <= _ceiling(ceiling)),
            key=lambda pair: envelopes[pair].upper,
        )
        if round_ == 0 and rest and envelopes[rest[0]].upper < self.best():
            self.evaluated.update(exact.exact_pairs(self.res, self.us, self.vs, rest[:1], self.state))
            rest = rest[1:]
        return [pair for pair in rest if envelopes[pair].lower <= _ceiling(self.best())], envelopes


def early_pairs(estimates: torch.Tensor, sample_l1: float, first: Pair) -> list[Pair]:
    """The pairs whose first tangents are taken in the pass of the dual sums, at an end of their sampled
    brackets (``tangents.far_end``), before it is known whether the dual bounds rule them out: at most
    EARLY_PAIRS, each with an estimated gain of at least EARLY_GAIN times the first pair's. (At steps that are
    not near ties, the pairs the dual bounds leave are those of the best estimates: taking their tangents early
    saves a pass.)"""
    gains = (sample_l1 - estimates).tolist()
    floor = EARLY_GAIN * gains[first[0]][first[1]]
    found = sorted(
        (-gain, (a, b))
        for a, row in enumerate(gains)
        for b, gain in enumerate(row)
        if (a, b) != first and gain >= floor
    )
    return [pair for _, pair in found[:EARLY_PAIRS]]


def sample_objectives(p, q, us, vs, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Every pair's objective estimated on a uniform sample of entries ([Mu, Mv]), and the sample's ||R||_1
    on the same scale. They only decide which pairs are evaluated first, never the result."""
    n = min(ESTIMATE_SAMPLE, max(ESTIMATE_MIN, p.shape[0] * q.shape[0] // ESTIMATE_SPARSITY))
    i = torch.randint(p.shape[0], (n,), generator=gen, device=p.device)
    j = torch.randint(q.shape[0], (n,), generator=gen, device=p.device)
    r = (p[i] * q[j]).sum(1)  # [n], in the compute dtype (estimates need no more)
    objectives = exact.pair_medians(r, us, vs, i, j)[1]
    return objectives.cpu(), float(r.abs().sum(dtype=torch.float64))


def lower_bounds(
    p: torch.Tensor, q: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, powers: tuple = BOUND_POWERS
) -> tuple[torch.Tensor, float]:
    """Certified lower bounds on every pair's objective over R = p @ q^T, from a pass of their own; returns
    ([Mu, Mv], ||R||_1)."""
    sums, state = DualSums(vs, powers), FitState(us, vs, 0)
    res = Residual(p, q)
    read_pass(res, [sums])
    totals = sums.finish(state)
    return DualBounds.of(totals, p, q, state).lower, totals.l1
