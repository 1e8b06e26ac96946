"""The engine: MAS-SVD and SSI of one LoRA update, computed exactly as the spec pins them, from the factors.

The computation
---------------
The project's spec of the paper's method section (``shared/spec/MAS-SVD.md``) pins every choice the paper leaves
open; the engine implements exactly that:

1. row-normalise dW (Wt), then column-normalise Wt (Wh), eps_n = 1e-8;
2. candidates: the top-M left singular vectors of Wh and the top-M right singular vectors of Wt;
3. M greedy steps: every candidate pair (a, b) gets delta = the lower weighted median of R_ij / (u_i v_j)
   (weights |u_i v_j|) and the objective sum over all entries of |R_ij - delta u_i v_j|; the smallest objective
   wins (exact ties: smallest a, then b); R is deflated by the pick;
4. S = singular values of the fitted F; ``mas-svd`` rescales them by the mean row norm times the mean column
   norm of dW; SSI = S'_1 / (S'_1 + ... + S'_h + 1e-6).

How the engine computes it, without changing the result:

- dW has rank r, so the norms and all three SVDs work on the factors (QR of B and A, then r x r SVDs), in
  float64; no d x k matrix is ever formed. The L1 fit, the only work over all d x k entries, runs in float32
  by default (``--dtype float64`` for more), one bounded chunk of rows at a time, with float64 accumulators.
- Each pair's weighted median is found exactly: a sample weighted by |u_i v_j| brackets it, one pass over all
  entries sums what lies outside the bracket and keeps what lies inside, and a linear-time weighted selection
  finds the median among the kept entries; a bracket that misses is widened and the pass repeated, so the
  sample only affects speed.
- Pairs that cannot win are skipped on certified lower bounds, never on estimates. By L1 duality a pair's
  objective is at least <W, R> for any W with |W_ij| <= 1 and <W, u v^T> = 0; the engine builds such W from
  sign(R) and a correction along sign(u v^T) |u v^T|^alpha (alpha = 0; at steps where the gains are near
  ties, also alpha = 2), which costs one pass over R per step (sign(R) and |R| against the candidates, in the
  same pass that subtracts the previous pick) for all pairs at once. The pairs these bounds leave get tangent
  bounds: the objective is convex in delta, and one pass that forms no ratio gives its value and slope at both
  ends of a bracket, so the tangents bound it from below (and the values from above). The tangent at 0 comes
  with the dual sums, so a bracket that holds 0 is probed at one end only. Brackets are narrowed around the
  minimum for a few rounds while that rules out pairs. A pair is evaluated exactly unless a bound exceeds the
  best exact objective by more than a relative 1e-6 (``screening.BOUND_SLACK``); the tangent bounds are
  widened by the rounding their sums allow, by the one rounding model of the engine (``rounding``).
  ``--exhaustive`` evaluates every pair; both give the same picks (tested).
- Where the spec leaves a choice open: directions with a numerically zero singular value (when dW has rank
  below M) are not unique, so they are not used as candidates, and the layer's notes say how many were; an
  all-zero update has SSI 0 (S' is all zeros, so SSI = 0 / (0 + 1e-6)), and is noted as such.

The spec's worked check, as the tool prints it (float64): picks (1, 1) then (2, 2), S' = (331.5348535575,
161.5729241058), SSI = 0.6723375049; ``--method svd``: SSI = 0.6872004952 (float32: equal to 1e-5 relative).

The same result on every machine: pairs whose objectives are within rounding of the best (``fit.NEAR_TIE`` units
in the last place of the compute dtype) are compared again on objectives decided in float64 from the factors, in
an order fixed by their definition (``fit.objectives64``), so that no pick depends on the CPU, the thread count,
the chunking or whether the kernels are compiled.

The modules, in the order of the spec:

- ``spectra``: the public entry (``mas_svd``), the candidates (steps 1-3), the fit's spectrum and magnitude
  (steps 5-6); the spec's constants, SSI and the ``svd`` ablation are in ``s3lora_cli.spectral`` (NumPy: ``svd``
  needs no PyTorch);
- ``fit``: the greedy fit (step 4): its steps, the pick, near ties decided in float64;
- ``whole``: the steps of a small layer, each one compiled call over its whole residual that bounds every pair
  and fits exactly those the bounds leave;
- ``exact``: exhaustive evaluation: every pair's exact median and objective, in one pass or in one batch;
- ``residual``: the residual, its chunks and deflation, and the one pass driver that feeds every consumer;
- ``state``: what a fit keeps between its steps (draws, candidate terms);
- ``screening``: the certified screening of a step; ``bounds``: the dual lower bounds; ``tangents``: the
  tangent bounds; ``rounding``: the one rounding-error model of every bound;
- ``kernels``: the compiled CPU kernels (numba), with the tensor implementation as their fallback.
"""

from s3lora_cli.engine.fit import l1_fit
from s3lora_cli.engine.spectra import (
    col_norms,
    fit_spectrum,
    lowrank_svd,
    magnitude,
    mas_svd,
    mas_svd_candidates,
    row_norms,
)
from s3lora_cli.spectral import (
    DEFAULT_COMPONENTS,
    EPS_NORM,
    EPS_SSI,
    RANK_RTOL,
    Method,
    Pick,
    Spectrum,
    ssi,
    svd_spectrum,
)

__all__ = [
    "DEFAULT_COMPONENTS",
    "EPS_NORM",
    "EPS_SSI",
    "RANK_RTOL",
    "Method",
    "Pick",
    "Spectrum",
    "col_norms",
    "fit_spectrum",
    "l1_fit",
    "lowrank_svd",
    "magnitude",
    "mas_svd",
    "mas_svd_candidates",
    "row_norms",
    "ssi",
    "svd_spectrum",
]
