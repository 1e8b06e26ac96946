"""The public math entry: MAS-SVD, SSI and the ablation spectra of one LoRA update (takes tensors, returns tensors
or frozen dataclasses). The computation lives in the ``engine`` package, whose docstring describes it; this
module names what the rest of the package and users import."""

from s3lora_cli.engine import (
    DEFAULT_COMPONENTS,
    EPS_NORM,
    EPS_SSI,
    RANK_RTOL,
    Method,
    Pick,
    Spectrum,
    col_norms,
    fit_spectrum,
    l1_fit,
    lowrank_svd,
    magnitude,
    mas_svd,
    mas_svd_candidates,
    row_norms,
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
