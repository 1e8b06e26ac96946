"""Every option the commands share, defined once as a typed ``Annotated`` alias (``quiet: Quiet = False``), and
the choices they parse; light copies of the library's choices and defaults, so that parsing the command line
imports neither the math nor PyTorch (a test keeps the copies equal)."""

from __future__ import annotations

import copy
import enum
from pathlib import Path
from typing import Annotated, Any, Optional, get_args

import typer

# Defaults of the library that the options' help names (a test keeps them equal to the library's).
DEFAULT_TAU = 10
DEFAULT_COMPONENTS = 8
DEFAULT_TOP = 3
DEFAULT_NEIGHBOURS = 3
DEFAULT_DUPLICATE_THRESHOLD = 0.95


class MethodName(str, enum.Enum):
    """The --method choices: the values of ``spectral.Method`` (a test keeps them equal), named here so that
    parsing the command line does not import the math."""

    MAS_SVD = "mas-svd"
    SPSVD = "spsvd"
    SVD = "svd"

    def method(self) -> Any:
        from s3lora_cli.spectral import Method

        return Method(self.value)


def method_of(name: MethodName | None) -> Any:
    """The ``spectral.Method`` of a --method value (None: the default, mas-svd)."""
    return (name or MethodName.MAS_SVD).method()


class InputFormat(str, enum.Enum):
    auto = "auto"
    peft = "peft"
    kohya = "kohya"
    diffusers = "diffusers"
    mlx = "mlx"


class Format(str, enum.Enum):
    """The formats of a score report (score, prune, eval)."""

    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"


# --- the output (every command that writes an artifact) -----------------------------------------------------

Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file instead of stdout.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an output that exists (never done without it).")]
FORMAT = typer.Option("--format", "-f", help="Output format.")
"""The --format option; each command gives its own choices: ``fmt: Annotated[CheckFormat, FORMAT]``."""
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, summary or warnings on stderr.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print every layer, not only the layers that matter.")]

# --- the adapter and how it is scored -----------------------------------------------------------------------

AdapterArgument = Annotated[
    str,
    typer.Argument(
        metavar="ADAPTER",
        show_default=False,
        help="Adapter directory, one of its files, or a Hugging Face Hub id (org/name) in the local cache.",
    ),
]
MethodOption = Annotated[
    Optional[MethodName],
    typer.Option(
        "--method",
        help="Spectral method: mas-svd (the paper), spsvd (no magnitude step) or svd (plain singular values), "
        "paper Table 5 (default: mas-svd).",
    ),
]
Components = Annotated[
    Optional[int],
    typer.Option(
        "--components",
        "-M",
        help=f"M, the rank-1 components of the L1 fit (default: min({DEFAULT_COMPONENTS}, r), r the layer's rank).",
    ),
]
TopH = Annotated[
    Optional[int], typer.Option("--top-h", help="h, the singular values in SSI's denominator (default: M).")
]
Exhaustive = Annotated[
    bool,
    typer.Option(
        "--exhaustive", help="Evaluate every candidate pair exactly, without screening (same result, slower)."
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N. --method svd computes on the CPU.",
    ),
]
Dtype = Annotated[str, typer.Option("--dtype", help="Compute dtype of the L1 fit: float32 or float64.")]
InputFormatOption = Annotated[
    InputFormat, typer.Option("--input-format", help="Adapter format: auto (detect), peft, kohya, diffusers or mlx.")
]
Revision = Annotated[
    Optional[str],
    typer.Option(
        "--revision",
        help="For a Hugging Face Hub id (org/name): the cached revision to read, a branch, tag or commit "
        "(default: main).",
    ),
]
AdapterName = Annotated[
    Optional[str],
    typer.Option(
        "--adapter",
        help="Which of several PEFT adapters saved in one directory (its adapter_name; 'default' is the "
        "directory's own).",
    ),
]

Jobs = Annotated[
    Optional[int],
    typer.Option(
        "--jobs",
        min=1,
        help="Layers scored at once, each with its share of the cores (default: 1 below 8 cores, then one per 4 "
        "cores, at most 4).",
    ),
]

# --- which layers (prune, eval) -----------------------------------------------------------------------------

Threshold = Annotated[Optional[float], typer.Option("--threshold", help="Prune every layer with SSI >= this (0-1).")]
Fraction = Annotated[
    Optional[float],
    typer.Option(
        "--fraction", help="Prune the top fraction of layers by SSI (0-1], rounded up: 0.1 of 25 layers prunes 3."
    ),
]

# --- the gate (check, scan, admit); a policy file or [tool.s3lora] supplies what they leave unset -------------

MaxSsi = Annotated[
    Optional[float],
    typer.Option("--max-ssi", help="A layer whose SSI is above this is a violation (default: no such rule)."),
]
MaxViolations = Annotated[
    Optional[int],
    typer.Option(
        "--max-violations",
        "--max-flagged",
        help="How many layers may exceed --max-ssi (violations tolerated) before the gate fails (default: 0).",
    ),
]
Baseline = Annotated[
    Optional[Path],
    typer.Option("--baseline", help="Approved adapter to compare with, layer by layer (matched by module name)."),
]
MaxIncrease = Annotated[
    Optional[float],
    typer.Option("--max-increase", help="A layer whose SSI rose by more than this over --baseline is a violation."),
]
StrictLayers = Annotated[
    Optional[bool],
    typer.Option(
        "--strict-layers/--no-strict-layers",
        help="Also fail on layers new in, or missing from, the adapter vs --baseline (default: only report them).",
    ),
]
PolicyFile = Annotated[
    Optional[Path],
    typer.Option("--policy", help="TOML policy file, read instead of pyproject.toml's [tool.s3lora] table; flags win."),
]

# --- stores (scan, admit) -----------------------------------------------------------------------------------

StoreOption = Annotated[Path, typer.Option("--store", help="The store directory (created if missing).")]
Quarantine = Annotated[
    Optional[Path],
    typer.Option("--quarantine", help="Where refused adapters go (default <store>.quarantine beside the store)."),
]
AuditLog = Annotated[
    Optional[Path],
    typer.Option("--audit-log", help="JSON-lines log of every decision (default <store>/.s3lora-audit.jsonl)."),
]
Neighbours = Annotated[int, typer.Option("--neighbours", help="How many nearest adapters to list.")]
DuplicateThreshold = Annotated[
    float, typer.Option("--duplicate-threshold", help="Flag a neighbour whose update cosine is at least this.")
]


def gate_flags(
    max_ssi: float | None,
    max_violations: int | None,
    baseline: Path | None,
    max_increase: float | None,
    strict_layers: bool | None,
    method: MethodName | None,
    components: int | None,
    top_h: int | None,
) -> dict[str, Any]:
    """The gate's command-line values, by the names the policy file uses (None: not given)."""
    return {
        "max-ssi": max_ssi,
        "max-violations": max_violations,
        "baseline": baseline,
        "max-increase": max_increase,
        "strict-layers": strict_layers,
        "method": method and method.value,
        "components": components,
        "top-h": top_h,
    }


def as_default(alias: Any, default: Any) -> Any:
    """The option of an ``Annotated`` alias as a parameter default, ``quiet: bool = as_default(Quiet, False)``,
    for a command written in that style: the same definition, not a copy of it."""
    info = copy.copy(get_args(alias)[1])
    info.param_decls = (info.default, *(info.param_decls or ()))
    info.default = default
    return info


def score_options(
    method: MethodName | None,
    components: int | None,
    top_h: int | None,
    exhaustive: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    input_format: InputFormat | None = None,
    adapter_name: str | None = None,
) -> Any:
    """The ``scoring.ScoreOptions`` of the scoring options (PyTorch is imported here, when a command runs)."""
    from s3lora_cli.scoring import ScoreOptions

    return ScoreOptions(
        method=method_of(method),
        components=components,
        top_h=top_h,
        exhaustive=exhaustive,
        device=device,
        dtype=dtype,
        input_format=None if input_format is None else input_format.value,
        adapter_name=adapter_name,
    )
