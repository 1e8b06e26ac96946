"""Scoring an adapter: resolves the device, walks the layers one at a time, and returns per-layer results.

The factors are read as NumPy arrays and checked here; the ``svd`` ablation is computed from them in NumPy
(``spectral``), so that it never loads PyTorch; MAS-SVD and ``spsvd`` hand them to the engine as PyTorch tensors
on the device."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from s3lora_cli import cores
from s3lora_cli._version import __version__
from s3lora_cli.adapters import Adapter, LoraLayer, SkippedTensor, open_adapter
from s3lora_cli.adapters.detect import check_adapter_name, check_format_name
from s3lora_cli.errors import RuntimeProblem, UsageError
from s3lora_cli.spectral import DEFAULT_COMPONENTS, EPS_NORM, EPS_SSI, RANK_RTOL, Method, Pick, Spectrum, svd_ablation

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "float64")
DEVICES = "auto, cpu, cuda or cuda:N"

# The range each compute dtype scores exactly, as a bound on ||left||_F * ||right||_F (>= every entry and every row
# and column norm of dW). Measured on this engine: float32 goes wrong (silently, then with an error) once dW's
# entries near float32's largest value (bound ~4e39); float64 once the bound passes ~1e100, where the spectrum's
# products leave its range. Both limits keep 8 and 20 orders of magnitude from those edges.
FLOAT32_LIMIT = 1e30
FLOAT64_LIMIT = 1e80
FLOAT64_NOTE = "scored in float64: the update's values are beyond what float32 scores exactly"


def check_device(spec: str) -> str:
    """The device spec, normalised, if it is spelled as one (``auto``, ``cpu``, ``cuda`` or ``cuda:N``); whether
    the device exists is ``resolve_device``'s to say."""
    spec = spec.strip().lower()
    index = spec.partition(":")[2]
    if spec in ("auto", "cpu", "cuda") or (spec.startswith("cuda:") and index.isdigit()):
        return spec
    raise UsageError(f"--device {spec!r}: expected {DEVICES}")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    spec = check_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec != "cpu":
        if not torch.cuda.is_available():
            raise RuntimeProblem(f"--device {spec}: CUDA is not available here; use --device cpu (or auto)")
        index = spec.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise RuntimeProblem(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device(spec)


def scoring_device(options: ScoreOptions) -> str:
    """Where the layers are scored: the device ``options.device`` resolves to; always the CPU for the ``svd``
    ablation, whose work (a QR of each factor and a q x q SVD) is too small for a GPU, and which needs no
    PyTorch. Only ``auto`` and ``cuda`` load PyTorch here (a scan whose scores are all cached needs no more)."""
    spec = check_device(options.device)
    if options.method is Method.SVD or spec == "cpu":  # no PyTorch needed to say so
        return "cpu"
    return str(resolve_device(spec))


@dataclass(frozen=True)
class ScoreOptions:
    """How to score. components (M) and top_h (h) default per layer to min(8, r) and M. input_format (None:
    detect; else "peft", "kohya", "diffusers" or "mlx") and adapter_name (one of several PEFT adapters saved in
    one directory) say what to read."""

    method: Method = Method.MAS_SVD
    components: int | None = None
    top_h: int | None = None
    exhaustive: bool = False
    device: str = "auto"
    dtype: str = "float32"
    input_format: str | None = None
    adapter_name: str | None = None

    def __post_init__(self) -> None:
        try:  # the API takes the method's name too ("svd"), as the CLI does
            object.__setattr__(self, "method", Method(self.method))
        except ValueError:
            raise UsageError(
                f"method must be one of {', '.join(m.value for m in Method)}, got {self.method!r}"
            ) from None
        check_format_name(self.input_format)
        check_adapter_name(self.adapter_name)
        if self.components is not None and self.components < 1:
            raise UsageError(f"--components must be at least 1, got {self.components}")
        if self.top_h is not None and self.top_h < 1:
            raise UsageError(f"--top-h must be at least 1, got {self.top_h}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class LayerScore:
    """The result for one LoRA layer. ``ssi`` is None when the layer could not be scored (see ``error``)."""

    layer: LoraLayer
    ssi: float | None
    sigma: tuple[float, ...]
    components: int
    top_h: int
    picks: tuple[Pick, ...] = ()
    candidates: tuple[int, int] = (0, 0)
    pairs_exact: int = 0
    pairs_total: int = 0
    notes: tuple[str, ...] = ()
    error: str | None = None

    @property
    def module(self) -> str:
        return self.layer.module

    @property
    def sigma_1(self) -> float | None:
        return self.sigma[0] if self.sigma else (None if self.ssi is None else 0.0)

    @property
    def sigma_sum(self) -> float | None:
        return None if self.ssi is None else float(sum(self.sigma))

    @property
    def fit_rank(self) -> int | None:
        """How many of the S' values in SSI are not numerically zero (below RANK_RTOL times S'_1, the rule
        the candidates use): the rank of the L1 fit F among them (of dW for ``svd``). 1 means SSI is 1 by
        construction (S'_2..S'_h are 0), whatever the layer's size; None for an unscored layer."""
        if self.ssi is None:
            return None
        if not self.sigma or self.sigma[0] == 0.0:
            return 0
        return sum(s > self.sigma[0] * RANK_RTOL for s in self.sigma)


@dataclass(frozen=True)
class AdapterInfo:
    path: str
    weights_file: str
    sha256: str
    format: str
    base_model_name_or_path: str | None
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    target_modules: object


@dataclass(frozen=True)
class ScoreReport:
    """Everything ``score`` found: the adapter, the parameters, the layers ranked by SSI (highest
    first, then by module name; unscored layers last), and the tensors that were not analysed."""

    adapter: AdapterInfo
    options: ScoreOptions
    device: str
    layers: tuple[LayerScore, ...]
    not_analysed: tuple[SkippedTensor, ...]
    tool_version: str = __version__
    parameters: dict = field(default_factory=dict)


def rank_key(score: LayerScore) -> tuple:
    """Sort key: SSI descending, then module name; unscored layers after all scored ones."""
    return (score.ssi is None, -(score.ssi or 0.0), score.module)


def score_layer(
    left: np.ndarray, right: np.ndarray, layer: LoraLayer, options: ScoreOptions, device: str = "cpu"
) -> LayerScore:
    """Score one layer from its factors (dW = left @ right: [d, r] @ [r, k], float32 or float64 NumPy arrays);
    the L1 fit runs on ``device``.

    A layer with NaN or Inf values, or whose values are out of the range float64 scores exactly, is returned
    unscored with the reason in ``error``, as is one the engine cannot score; the run goes on. A layer beyond
    float32's range (FLOAT32_LIMIT) is scored in float64, its factors first balanced by a power of two (exact:
    dW is unchanged to the last bit), so that SSI is the spec's own, 1e-6 constant included: nothing is rescaled.
    """
    m = min(options.components or DEFAULT_COMPONENTS, layer.r)
    h = options.top_h or m
    notes = list(layer.notes)

    def unscored(error: str) -> LayerScore:
        return LayerScore(layer, None, (), m, h, notes=tuple(notes), error=error)

    for name, factor in (("lora_B", left), ("lora_A", right)):
        if not bool(np.isfinite(factor).all()):
            return unscored(f"non-finite values (NaN or Inf) in {name}; not scored")
    bound = update_bound(left, right)
    if not bound <= FLOAT64_LIMIT:
        return unscored(
            f"values out of range (||lora_B|| * ||lora_A|| = {bound:.3g}, above {FLOAT64_LIMIT:g}, "
            "where float64 cannot score it exactly); not scored"
        )
    if bound > FLOAT32_LIMIT and left.dtype != np.float64:
        left, right = balanced(left.astype(np.float64), right.astype(np.float64))
        notes.append(FLOAT64_NOTE)
    try:
        spectrum = (
            svd_ablation(left, right, h)
            if options.method is Method.SVD
            else _fitted(left, right, m, h, options, device)
        )
    except (ArithmeticError, ValueError, RuntimeError) as exc:  # LinAlgError: a ValueError (NumPy), RuntimeError
        return unscored(f"could not be scored ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})")
    if not math.isfinite(spectrum.ssi) or not all(math.isfinite(x) for x in spectrum.sigma):
        return unscored("the spectrum is not finite (values out of range); not scored")
    if options.method is not Method.SVD and spectrum.candidates != (m, m):
        rank_note = f"dW has rank below M={m}: {min(spectrum.candidates)} candidate direction(s) used"
        notes.append("all-zero update: SSI is 0" if spectrum.candidates == (0, 0) else rank_note)
    elif options.method is Method.SVD and not any(spectrum.sigma):
        notes.append("all-zero update: SSI is 0")
    return LayerScore(
        layer,
        spectrum.ssi,
        spectrum.sigma,
        m,
        h,
        spectrum.picks,
        spectrum.candidates,
        spectrum.pairs_exact,
        spectrum.pairs_total,
        tuple(notes),
    )


def _fitted(left: np.ndarray, right: np.ndarray, m: int, h: int, options: ScoreOptions, device: str) -> Spectrum:
    """MAS-SVD or ``spsvd`` by the engine, on ``device``."""
    import torch

    from s3lora_cli.engine import mas_svd

    left_t, right_t = (torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in (left, right))
    return mas_svd(left_t, right_t, components=m, top_h=h, method=options.method, exhaustive=options.exhaustive)


def update_bound(left: np.ndarray, right: np.ndarray) -> float:
    """||left||_F * ||right||_F in float64 (inf when even that overflows): an upper bound on every entry, row
    norm and column norm of dW = left @ right, and on ||dW||_F."""
    with np.errstate(over="ignore"):
        return float(np.linalg.norm(left.astype(np.float64).ravel())) * float(
            np.linalg.norm(right.astype(np.float64).ravel())
        )


def balanced(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(left * 2^k, right * 2^-k) with k making the two norms about equal: dW = left @ right is unchanged
    exactly (a power of two only moves the exponent, and float64 has room for it), while neither factor alone
    is far from sqrt of dW's size, so the norms and Gram matrices of the factors stay in range."""
    nl, nr = float(np.linalg.norm(left.ravel())), float(np.linalg.norm(right.ravel()))
    if not (nl > 0 and nr > 0 and math.isfinite(nl) and math.isfinite(nr)):
        return left, right
    k = round(0.5 * (math.log2(nr) - math.log2(nl)))
    return np.ldexp(left, k), np.ldexp(right, -k)


_MEMO: ContextVar[dict[tuple, LayerScore] | None] = ContextVar("s3lora_layer_memo", default=None)


@contextmanager
def layer_memo() -> Iterator[None]:
    """Within this block, a layer scored before with the same description, factors and options is not scored
    again: ``score_layer`` is a function of those alone. The gate of ``adapt`` scores an adapter to prune it, then
    its pruned copy to admit it, whose unpruned layers are the same tensors."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _memo_key(layer: LoraLayer, left: np.ndarray, right: np.ndarray, options: ScoreOptions) -> tuple:
    """What ``score_layer``'s result depends on: the layer's description, the options, and the factors' dtype,
    shape and bytes (their digest)."""
    digest = hashlib.blake2b(digest_size=32)
    for factor in (left, right):
        digest.update(f"{factor.dtype}{tuple(factor.shape)}".encode())
        digest.update(np.ascontiguousarray(factor).tobytes())
    return repr(layer), repr(options), digest.hexdigest()


def iter_scores(adapter: Adapter, options: ScoreOptions, device: str = "cpu", jobs: int = 1) -> Iterator[LayerScore]:
    """Score the adapter's layers in file order, ``jobs`` at a time (only that many layers' tensors in memory), each
    with its share of the cores (``cores``). Factors whose scaling takes them past float32's range are read again
    in float64 (their stored values may be finite). The ``svd`` ablation runs in this thread, without PyTorch."""

    def loaded() -> Iterator[tuple[LoraLayer, np.ndarray, np.ndarray]]:
        for layer in adapter.layers:
            left, right = adapter.load_factors(layer, options.dtype)
            if options.dtype != "float64" and not (np.isfinite(left).all() and np.isfinite(right).all()):
                wide = adapter.load_factors(layer, "float64")
                if all(np.isfinite(x).all() for x in wide):
                    left, right = wide
            yield layer, left, right

    memo = _MEMO.get()

    def score(item: tuple[LoraLayer, np.ndarray, np.ndarray]) -> LayerScore:
        if memo is None:
            return computed(item)
        key = _memo_key(item[0], item[1], item[2], options)
        if key not in memo:
            memo[key] = computed(item)
        return memo[key]

    budget: cores.Budget | None = None

    def computed(item: tuple[LoraLayer, np.ndarray, np.ndarray]) -> LayerScore:
        if budget is not None:
            budget.adjust()
        return score_layer(item[1], item[2], item[0], options, device)

    if options.method is Method.SVD:  # NumPy's small factorisations: no threads to share
        yield from map(score, loaded())
        return

    import torch

    before = torch.get_num_threads()  # a caller's own choice is the most taken, and restored after
    threads = min(cores.share(jobs), before)
    if jobs <= 1:  # one job: fewer threads while the machine is busy
        budget = cores.Budget(threads)

    try:
        yield from cores.ordered_map(score, loaded(), jobs, start=lambda: cores.set_threads(threads))
    finally:
        cores.set_threads(before)


def score_adapter(
    path: str | Path,
    options: ScoreOptions | None = None,
    progress: Callable[[int, int, LoraLayer], None] | None = None,
    jobs: int = 1,
) -> ScoreReport:
    """Score every LoRA layer of the adapter at ``path``; returns a ScoreReport, prints nothing.

    ``progress(done, total, layer)`` is called after each layer; ``jobs`` layers are scored at once (the result
    does not depend on it; see ``cores.default_jobs``).
    """
    options = options or ScoreOptions()
    device = scoring_device(options)
    with closing(open_adapter(path, options.input_format, options.adapter_name)) as adapter:
        scores = []
        total = len(adapter.layers)
        for done, score in enumerate(iter_scores(adapter, options, device, jobs), start=1):
            scores.append(score)
            if progress is not None:
                progress(done, total, score.layer)
        cfg = adapter.config
        info = AdapterInfo(
            str(path),
            str(adapter.weights_path),
            adapter.sha256(),
            adapter.format,
            cfg.base_model_name_or_path,
            cfg.peft_type,
            cfg.r,
            cfg.lora_alpha,
            cfg.use_rslora,
            cfg.use_dora,
            cfg.target_modules,
        )
        skipped = adapter.skipped
    parameters = {
        "method": options.method.value,
        "components": options.components,
        "top_h": options.top_h,
        "exhaustive": options.exhaustive,
        "eps_norm": EPS_NORM,
        "eps_ssi": EPS_SSI,
        "device": device,
        "dtype": options.dtype,
    }
    return ScoreReport(info, options, device, tuple(sorted(scores, key=rank_key)), skipped, parameters=parameters)
