"""The CI gate: its settings (flags over a policy file over pyproject.toml), the baseline comparison, and the
rules applied to a scored adapter; returns a frozen GateResult and never prints."""

from __future__ import annotations

import enum
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from s3lora_cli.adapters import LoraLayer
from s3lora_cli.errors import UsageError
from s3lora_cli.scoring import ScoreOptions, ScoreReport, score_adapter
from s3lora_cli.spectral import Method

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

COMMAND_LINE = "command line"
BUILT_IN = "built-in"
PYPROJECT = "pyproject.toml"
POLICY_TABLE = ("tool", "s3lora")


class Rule(str, enum.Enum):
    """What a layer can break. ``non-finite`` always applies; the others when their setting is given."""

    NON_FINITE = "non-finite"
    MAX_SSI = "max-ssi"
    MAX_INCREASE = "max-increase"
    NEW_LAYER = "new-layer"
    MISSING_LAYER = "missing-layer"


RULE_ORDER = {rule: i for i, rule in enumerate(Rule)}

RULE_HELP = {
    Rule.NON_FINITE: "The layer's update has NaN or Inf values, so it cannot be scored; it always fails the gate.",
    Rule.MAX_SSI: "The layer's Spectral Sharpness Index exceeds max-ssi (more than max-violations such layers fail).",
    Rule.MAX_INCREASE: "The layer's SSI rose by more than max-increase over the same module in the baseline.",
    Rule.NEW_LAYER: "The layer is not in the baseline adapter (fails only with strict-layers).",
    Rule.MISSING_LAYER: "A layer of the baseline adapter is missing from this one (fails only with strict-layers).",
}


@dataclass(frozen=True)
class GatePolicy:
    """The resolved gate settings and scoring options.

    max_ssi: fail a layer whose SSI is above this (in [0, 1]); None: no such rule.
    max_violations: how many layers may exceed max_ssi before the gate fails (default 0).
    max_increase: fail a layer whose SSI rose by more than this over the baseline (in [0, 1]).
    baseline: the approved adapter to compare with; max_increase and baseline come together.
    strict_layers: layers new in the candidate, or missing from it, fail the gate (otherwise only reported).
    method, components, top_h: how both adapters are scored (see ScoreOptions).
    sources: for each setting given, where it came from: "command line", or the policy file's path.
    """

    max_ssi: float | None = None
    max_violations: int = 0
    max_increase: float | None = None
    baseline: Path | None = None
    strict_layers: bool = False
    method: Method = Method.MAS_SVD
    components: int | None = None
    top_h: int | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_increase is not None and self.baseline is None:
            raise UsageError("max-increase needs a baseline: pass --baseline DIR (or set baseline in the policy)")
        if self.baseline is not None and self.max_increase is None:
            raise UsageError("--baseline needs --max-increase (or max-increase in the policy)")
        if self.max_ssi is None and self.max_increase is None:
            raise UsageError(
                "no gate rule given: pass --max-ssi, or --baseline with --max-increase, or a policy "
                "with them (--policy FILE, or a tool.s3lora table in pyproject.toml)"
            )

    def source(self, key: str) -> str:
        return self.sources.get(key, BUILT_IN)

    def score_options(self, device: str = "auto") -> ScoreOptions:
        """The options both the candidate and the baseline are scored with."""
        return ScoreOptions(method=self.method, components=self.components, top_h=self.top_h, device=device)


@dataclass(frozen=True)
class Violation:
    """One layer that broke one rule.

    value: what was compared with the limit (the SSI for max-ssi and new-layer, the rise in SSI for
    max-increase, the baseline's SSI for missing-layer, None for non-finite).
    fails: whether the rule it broke failed the gate (False: tolerated by max-violations, or by a
    non-strict comparison).
    """

    module: str
    rule: Rule
    value: float | None
    limit: float | None
    ssi: float | None
    baseline_ssi: float | None
    fails: bool
    message: str


@dataclass(frozen=True)
class RuleOutcome:
    """One rule as applied: its limit, how many violations it tolerates, how many it found, and where its
    setting came from."""

    rule: Rule
    limit: float | None
    allowed: int | None
    violations: int
    source: str

    @property
    def passed(self) -> bool:
        return self.allowed is None or self.violations <= self.allowed


@dataclass(frozen=True)
class LayerChange:
    """One module of the candidate or the baseline, matched by module name. increase = ssi - baseline_ssi
    when both are scored; ssi is None for a missing layer, baseline_ssi None for a new one."""

    module: str
    ssi: float | None
    baseline_ssi: float | None
    in_candidate: bool
    in_baseline: bool

    @property
    def increase(self) -> float | None:
        if self.ssi is None or self.baseline_ssi is None:
            return None
        return self.ssi - self.baseline_ssi


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on one adapter: the report, the rules, the violations (rule order, then the
    largest value first, then module name) and, with a baseline, the layer-by-layer comparison."""

    report: ScoreReport
    policy: GatePolicy
    rules: tuple[RuleOutcome, ...]
    violations: tuple[Violation, ...]
    baseline: ScoreReport | None = None
    changes: tuple[LayerChange, ...] = ()

    @property
    def passed(self) -> bool:
        return all(rule.passed for rule in self.rules)

    @property
    def new_layers(self) -> tuple[str, ...]:
        return tuple(c.module for c in self.changes if not c.in_baseline)

    @property
    def missing_layers(self) -> tuple[str, ...]:
        return tuple(c.module for c in self.changes if not c.in_candidate)

    @property
    def failing(self) -> tuple[Violation, ...]:
        return tuple(v for v in self.violations if v.fails)


# --- settings ---------------------------------------------------------------------------------------------


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where} must be a number, got {value!r}")
    if not low <= value <= high:
        raise UsageError(f"{where} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _count(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{where} must be a whole number, got {value!r}")
    if value < low:
        raise UsageError(f"{where} must be at least {low}, got {value!r}")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{where} must be true or false, got {value!r}")
    return value


def _method(value: Any, where: str) -> Method:
    try:
        return Method(value)
    except ValueError:
        raise UsageError(f"{where} must be one of {', '.join(m.value for m in Method)}, got {value!r}") from None


def _path(value: Any, where: str) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise UsageError(f"{where} must be a path, got {value!r}")
    return Path(value)


SETTINGS: dict[str, Callable[[Any, str], Any]] = {
    "max-ssi": lambda v, where: _number(v, where, 0.0, 1.0),
    "max-violations": lambda v, where: _count(v, where, 0),
    "max-increase": lambda v, where: _number(v, where, 0.0, 1.0),
    "baseline": _path,
    "strict-layers": _flag,
    "method": _method,
    "components": lambda v, where: _count(v, where, 1),
    "top-h": lambda v, where: _count(v, where, 1),
}
"""The keys of a policy (kebab-case, as the flags; snake_case is accepted) and their validators."""

FORMER_KEYS = {"max-flagged": "max-violations"}
"""Keys accepted under an earlier name (and the --max-flagged flag with them)."""


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml with a [tool.s3lora] table, from ``start`` up to the filesystem root."""
    for directory in (start.resolve(), *start.resolve().parents):
        candidate = directory / PYPROJECT
        if candidate.is_file() and POLICY_TABLE[1] in _read_toml(candidate).get("tool", {}):
            return candidate
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"policy file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"policy file {path} is a directory; --policy takes a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"policy file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"policy file {path} cannot be read: {exc}") from None


def load_policy_file(path: Path) -> dict[str, Any]:
    """The validated settings of a TOML policy file: its [tool.s3lora] table when it has a [tool] table
    (so a pyproject.toml works), otherwise its top-level keys. A relative baseline is taken relative to the
    file's directory; an unknown key is an error, since a misspelt limit would silently not apply."""
    doc = _read_toml(path)
    table: Any = doc
    if "tool" in doc:
        table = doc["tool"].get(POLICY_TABLE[1]) if isinstance(doc["tool"], dict) else None
        if not isinstance(table, dict):
            raise UsageError(f"policy file {path} has a tool table but no tool.s3lora table")
    settings = {}
    for raw_key, value in table.items():
        if isinstance(value, dict):  # a sub-table, such as [tool.s3lora.adapt], holds another command's settings
            continue
        key = raw_key.replace("_", "-")
        key = FORMER_KEYS.get(key, key)
        if key not in SETTINGS:
            raise UsageError(f"policy file {path}: unknown key {raw_key!r}; known keys: {', '.join(SETTINGS)}")
        settings[key] = SETTINGS[key](value, f"{key} in {path}")
    if "baseline" in settings and not settings["baseline"].is_absolute():
        settings["baseline"] = path.parent / settings["baseline"]
    return settings


def resolve_policy(flags: Mapping[str, Any], policy_file: Path | None = None, cwd: Path | None = None) -> GatePolicy:
    """The gate settings, by precedence: command-line ``flags`` (kebab-case keys; None means not given), then
    ``policy_file`` if given, otherwise the [tool.s3lora] table of the nearest pyproject.toml found upward
    from ``cwd``, then the built-in defaults. Only one file is read: --policy replaces pyproject.toml."""
    source_file = policy_file if policy_file is not None else find_pyproject(cwd or Path.cwd())
    from_file = load_policy_file(source_file) if source_file is not None else {}
    from_flags = {}
    for key, value in flags.items():
        if key not in SETTINGS:
            raise ValueError(f"unknown gate setting {key!r}")
        if value is not None:
            from_flags[key] = SETTINGS[key](value, f"--{key}")
    merged = {**from_file, **from_flags}
    sources = {key: str(source_file) for key in from_file} | {key: COMMAND_LINE for key in from_flags}
    return GatePolicy(**{key.replace("-", "_"): value for key, value in merged.items()}, sources=sources)


RULE_KEYS = ("max-ssi", "max-increase", "baseline")
"""The settings that make a gate rule (``baseline`` only with ``max-increase``)."""


def resolve_optional_policy(
    flags: Mapping[str, Any], policy_file: Path | None = None, device: str = "auto", cwd: Path | None = None
) -> tuple[GatePolicy | None, ScoreOptions]:
    """The policy and scoring options of a command whose gate is optional (``scan``), from the same flags and
    sources as ``resolve_policy``: with a rule (max-ssi, max-increase or baseline) anywhere, the policy and its
    options; without one, no policy and the options the flags and the file give (flags win)."""
    source = policy_file if policy_file is not None else find_pyproject(cwd or Path.cwd())
    from_file = load_policy_file(source) if source is not None else {}
    given = {k: v for k, v in flags.items() if v is not None}
    if any(k in given or k in from_file for k in RULE_KEYS):
        policy = resolve_policy(flags, policy_file, cwd)
        return policy, policy.score_options(device)
    merged = {**from_file, **{k: SETTINGS[k](v, f"--{k}") for k, v in given.items()}}
    options = ScoreOptions(
        method=merged.get("method", Method.MAS_SVD),
        components=merged.get("components"),
        top_h=merged.get("top-h"),
        device=device,
    )
    return None, options


# --- rules ------------------------------------------------------------------------------------------------


def compare(report: ScoreReport, baseline: ScoreReport) -> tuple[LayerChange, ...]:
    """Match the layers of ``report`` and ``baseline`` by module name (never by position); sorted by the
    rise in SSI, largest first, then layers without one (new, missing or unscored), then by module name."""
    ours = {s.module: s.ssi for s in report.layers}
    theirs = {s.module: s.ssi for s in baseline.layers}
    changes = [LayerChange(m, ours.get(m), theirs.get(m), m in ours, m in theirs) for m in ours.keys() | theirs.keys()]
    return tuple(sorted(changes, key=lambda c: (c.increase is None, -(c.increase or 0.0), c.module)))


def _violation(module: str, rule: Rule, value, limit, ssi, baseline_ssi, message: str) -> Violation:
    return Violation(module, rule, value, limit, ssi, baseline_ssi, True, message)


def evaluate(report: ScoreReport, policy: GatePolicy, baseline: ScoreReport | None = None) -> GateResult:
    """Apply the policy's rules to a scored adapter (and its baseline, when the policy has one).

    A layer exceeds max-ssi when SSI > max_ssi, and max-increase when SSI - baseline SSI > max_increase
    (strictly: a layer exactly at the limit passes). Unscored layers (NaN or Inf) always fail."""
    if policy.max_increase is not None and baseline is None:
        raise UsageError("max-increase needs a scored baseline")
    found: dict[Rule, list[Violation]] = {rule: [] for rule in Rule}
    _layer_violations(report, policy, found)
    changes: tuple[LayerChange, ...] = ()
    if baseline is not None and policy.max_increase is not None:
        changes = compare(report, baseline)
        _baseline_violations(changes, policy.max_increase, found)
    outcomes = _outcomes(policy, found)
    failed = {o.rule for o in outcomes if not o.passed}
    violations = [
        Violation(v.module, v.rule, v.value, v.limit, v.ssi, v.baseline_ssi, v.rule in failed, v.message)
        for rule in Rule
        for v in found[rule]
    ]
    violations.sort(key=lambda v: (RULE_ORDER[v.rule], v.value is None, -(v.value or 0.0), v.module))
    return GateResult(report, policy, tuple(outcomes), tuple(violations), baseline, changes)


def _layer_violations(report: ScoreReport, policy: GatePolicy, found: dict[Rule, list[Violation]]) -> None:
    """The layers that are not scored (NaN or Inf) and those above max-ssi, added to ``found``."""
    for s in report.layers:
        if s.ssi is None:
            found[Rule.NON_FINITE].append(
                _violation(s.module, Rule.NON_FINITE, None, None, None, None, s.error or "not scored")
            )
        elif policy.max_ssi is not None and s.ssi > policy.max_ssi:
            found[Rule.MAX_SSI].append(
                _violation(
                    s.module,
                    Rule.MAX_SSI,
                    s.ssi,
                    policy.max_ssi,
                    s.ssi,
                    None,
                    f"SSI {s.ssi:.4f} exceeds max-ssi {policy.max_ssi:g}",
                )
            )


def _baseline_violations(
    changes: tuple[LayerChange, ...], max_increase: float, found: dict[Rule, list[Violation]]
) -> None:
    """The layers whose SSI rose by more than max-increase, and those new in or missing from the candidate."""
    for c in changes:
        if c.increase is not None and c.increase > max_increase:
            found[Rule.MAX_INCREASE].append(
                _violation(
                    c.module,
                    Rule.MAX_INCREASE,
                    c.increase,
                    max_increase,
                    c.ssi,
                    c.baseline_ssi,
                    f"SSI rose by {c.increase:.4f} (from {c.baseline_ssi:.4f} to {c.ssi:.4f}), more than "
                    f"max-increase {max_increase:g}",
                )
            )
        elif not c.in_baseline:
            found[Rule.NEW_LAYER].append(
                _violation(c.module, Rule.NEW_LAYER, c.ssi, None, c.ssi, None, "not in the baseline adapter")
            )
        elif not c.in_candidate:
            found[Rule.MISSING_LAYER].append(
                _violation(
                    c.module,
                    Rule.MISSING_LAYER,
                    c.baseline_ssi,
                    None,
                    None,
                    c.baseline_ssi,
                    "in the baseline adapter only",
                )
            )


def _outcomes(policy: GatePolicy, found: dict[Rule, list[Violation]]) -> list[RuleOutcome]:
    """Each rule of the policy with its count of violations (whether it passed follows from them)."""
    outcomes = [RuleOutcome(Rule.NON_FINITE, None, 0, len(found[Rule.NON_FINITE]), BUILT_IN)]
    if policy.max_ssi is not None:
        outcomes.append(
            RuleOutcome(
                Rule.MAX_SSI, policy.max_ssi, policy.max_violations, len(found[Rule.MAX_SSI]), policy.source("max-ssi")
            )
        )
    if policy.max_increase is not None:
        outcomes.append(
            RuleOutcome(
                Rule.MAX_INCREASE, policy.max_increase, 0, len(found[Rule.MAX_INCREASE]), policy.source("max-increase")
            )
        )
        allowed = 0 if policy.strict_layers else None
        for rule in (Rule.NEW_LAYER, Rule.MISSING_LAYER):
            outcomes.append(RuleOutcome(rule, None, allowed, len(found[rule]), policy.source("strict-layers")))
    return outcomes


def check_adapters(
    paths: Sequence[str | Path],
    policy: GatePolicy,
    device: str = "auto",
    progress: Callable[[int, int, LoraLayer], None] | None = None,
    *,
    input_format: str | None = None,
    adapter_name: str | None = None,
) -> tuple[GateResult, ...]:
    """Score the baseline (once, when the policy has one) and each adapter with the policy's scoring options,
    and apply the gate to each; returns one GateResult per path, in the order given. ``input_format`` and
    ``adapter_name`` (see ScoreOptions) apply to the adapters and the baseline alike."""
    options = replace(policy.score_options(device), input_format=input_format, adapter_name=adapter_name)
    baseline = score_adapter(policy.baseline, options, progress) if policy.baseline is not None else None
    return tuple(evaluate(score_adapter(path, options, progress), policy, baseline) for path in paths)
