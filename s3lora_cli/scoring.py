"""Scoring an adapter: resolves the device, walks the layers one at a time, and returns per-layer results."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch

from s3lora_cli import cores
from s3lora_cli._version import __version__
from s3lora_cli.adapters import Adapter, LoraLayer, SkippedTensor, open_adapter
from s3lora_cli.adapters.detect import check_adapter_name, check_format_name
from s3lora_cli.errors import RuntimeProblem, UsageError
from s3lora_cli.spectral import DEFAULT_COMPONENTS, EPS_NORM, EPS_SSI, RANK_RTOL, Method, Pick, mas_svd

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# The range each compute dtype scores exactly, as a bound on ||left||_F * ||right||_F (>= every entry and every row
# and column norm of dW). Measured on this engine: float32 goes wrong (silently, then with an error) once dW's
# entries near float32's largest value (bound ~4e39); float64 once the bound passes ~1e100, where the spectrum's
# products leave its range. Both limits keep 8 and 20 orders of magnitude from those edges.
FLOAT32_LIMIT = 1e30
FLOAT64_LIMIT = 1e80
FLOAT64_NOTE = "scored in float64: the update's values are beyond what float32 scores exactly"


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise RuntimeProblem(f"--device {spec}: CUDA is not available here; use --device cpu (or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise RuntimeProblem(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device(spec)
    raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


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


def score_layer(left: torch.Tensor, right: torch.Tensor, layer: LoraLayer, options: ScoreOptions) -> LayerScore:
    """Score one layer from its factors (dW = left @ right: [d, r] @ [r, k]).

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

    for name, tensor in (("lora_B", left), ("lora_A", right)):
        if not bool(torch.isfinite(tensor).all()):
            return unscored(f"non-finite values (NaN or Inf) in {name}; not scored")
    bound = update_bound(left, right)
    if not bound <= FLOAT64_LIMIT:
        return unscored(
            f"values out of range (||lora_B|| * ||lora_A|| = {bound:.3g}, above {FLOAT64_LIMIT:g}, "
            "where float64 cannot score it exactly); not scored"
        )
    if bound > FLOAT32_LIMIT and left.dtype != torch.float64:
        left, right = balanced(left.to(torch.float64), right.to(torch.float64))
        notes.append(FLOAT64_NOTE)
    try:
        spectrum = mas_svd(left, right, components=m, top_h=h, method=options.method, exhaustive=options.exhaustive)
    except (ArithmeticError, ValueError, RuntimeError) as exc:  # torch's LinAlgError is a RuntimeError
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


def update_bound(left: torch.Tensor, right: torch.Tensor) -> float:
    """||left||_F * ||right||_F in float64 (inf when even that overflows): an upper bound on every entry, row
    norm and column norm of dW = left @ right, and on ||dW||_F."""
    return float(torch.linalg.vector_norm(left.to(torch.float64))) * float(
        torch.linalg.vector_norm(right.to(torch.float64))
    )


def balanced(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(left * 2^k, right * 2^-k) with k making the two norms about equal: dW = left @ right is unchanged
    exactly (a power of two only moves the exponent, and float64 has room for it), while neither factor alone
    is far from sqrt of dW's size, so the norms and Gram matrices of the factors stay in range."""
    nl, nr = float(torch.linalg.vector_norm(left)), float(torch.linalg.vector_norm(right))
    if not (nl > 0 and nr > 0 and math.isfinite(nl) and math.isfinite(nr)):
        return left, right
    k = round(0.5 * (math.log2(nr) - math.log2(nl)))
    return torch.ldexp(left, torch.tensor(k)), torch.ldexp(right, torch.tensor(-k))


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


def _memo_key(layer: LoraLayer, left: torch.Tensor, right: torch.Tensor, options: ScoreOptions) -> tuple:
    """What ``score_layer``'s result depends on: the layer's description, the options, and the factors' dtype,
    shape and bytes (their digest)."""
    digest = hashlib.blake2b(digest_size=32)
    for tensor in (left, right):
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return repr(layer), repr(options), digest.hexdigest()


def iter_scores(adapter: Adapter, options: ScoreOptions, device: torch.device, jobs: int = 1) -> Iterator[LayerScore]:
    """Score the adapter's layers in file order, ``jobs`` at a time (only that many layers' tensors in memory), each
    with its share of the cores (``cores``). Factors whose scaling takes them past float32's range are read again
    in float64 (their stored values may be finite)."""
    dtype = DTYPES[options.dtype]

    def loaded() -> Iterator[tuple[LoraLayer, torch.Tensor, torch.Tensor]]:
        for layer in adapter.layers:
            left, right = adapter.load_factors(layer, dtype, device)
            if dtype != torch.float64 and not (bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())):
                wide = adapter.load_factors(layer, torch.float64, device)
                if all(bool(torch.isfinite(t).all()) for t in wide):
                    left, right = wide
            yield layer, left, right

    before = torch.get_num_threads()  # a caller's own choice is the most taken, and restored after
    threads = min(cores.share(jobs), before)
    budget = cores.Budget(threads) if jobs <= 1 else None  # one job: fewer threads while the machine is busy

    memo = _MEMO.get()

    def score(item: tuple[LoraLayer, torch.Tensor, torch.Tensor]) -> LayerScore:
        if memo is None:
            return computed(item)
        key = _memo_key(item[0], item[1], item[2], options)
        if key not in memo:
            memo[key] = computed(item)
        return memo[key]

    def computed(item: tuple[LoraLayer, torch.Tensor, torch.Tensor]) -> LayerScore:
        if budget is not None:
            budget.adjust()
        return score_layer(item[1], item[2], item[0], options)

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
    device = resolve_device(options.device)
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
        "device": str(device),
        "dtype": options.dtype,
    }
    return ScoreReport(info, options, str(device), tuple(sorted(scores, key=rank_key)), skipped, parameters=parameters)
