"""The one rounding-error model behind every certified bound of the engine: how far a sum or a product
computed in the compute dtype can be from the exact value.

A total of n terms t_1..t_n, added in runs of ``run`` terms in the compute dtype (unit roundoff eps) and the
runs then in float64, differs from the exact sum by at most (run + SUM_SLACK) eps sum |t_l| (the classical
bound (run - 1) eps for recursive summation, plus the rounding of each term itself: the product, the
difference and the conversion that form it, and the float64 additions: SUM_SLACK in all). Every bound that
the screening relies on (the tangents' values and slopes, the tangent at 0 from the dual sums) widens itself
by exactly this model, and the tests check each against the exact float64 value.
"""

from __future__ import annotations

from dataclasses import dataclass

SUM_SLACK = 4
"""Units of eps per term beyond a summed run: 3 for the rounding of a term (a product, a difference, an
absolute value or a conversion to the compute dtype round once each, at most three of them) and 1 for the
float64 additions of the runs."""

PRODUCT_SLACK = 4
"""Units of eps per inner-product length in the rounding of a product of factors: a QR factorisation and a
matrix product of n terms are each off by a small multiple of n eps times the norms they combine."""


@dataclass(frozen=True)
class Rounding:
    """The rounding of one compute dtype, of unit roundoff ``eps``."""

    eps: float

    def of_sum(self, run: int, magnitude):
        """The error of a total added up in runs of ``run`` terms, given the sum of its terms' magnitudes."""
        return (run + SUM_SLACK) * self.eps * magnitude

    def of_product(self, length: int, scale):
        """The noise of a product of factors with inner dimension ``length``, relative to ``scale`` (the norms
        it combines): values below this are zero in exact arithmetic as far as the product can tell."""
        return PRODUCT_SLACK * length * self.eps * scale
