"""adapter_config.json: parsing, validation, and PEFT's per-module rank, alpha and scaling."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3lora_cli.adapters.safetensors_io import open_regular, short_repr, unique_keys
from s3lora_cli.errors import AdapterInputError

try:  # Python >= 3.11
    from re import _constants, _parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as _constants
    import sre_parse as _parser

CONFIG_NAME = "adapter_config.json"


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


# Bounds that keep rank_pattern / alpha_pattern matching fast on untrusted files (see check_pattern).
MAX_PATTERN_CHARS = 256
MAX_PATTERN_REPEATS = 2
MAX_MODULE_CHARS = 512
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_REGEX_KEYS = 64
"""At most this many rank_pattern (and alpha_pattern) keys that are regular expressions beyond module names;
keys that are module names (letters, digits, '_', '-', '.', ...) are not limited: they are matched through a
trie, without trying each key on each module."""
MAX_TRIE_STEPS = 20_000
"""Work allowed per module name when matching the module-name keys (a module name and keys that agree with it
only through many '.' wildcards); real configs take about the name's length."""
_SPECIAL = frozenset("^$*+?{}[]\\|()")
PATTERN_RULE = (
    f"keys are regular expressions of at most {MAX_PATTERN_CHARS} characters, without backreferences, "
    f"with at most {MAX_PATTERN_REPEATS} repetitions (*, +, {{m,n}}), each on a single character, "
    "class or '.', not on a group"
)

_REPEATS = (_constants.MAX_REPEAT, _constants.MIN_REPEAT, getattr(_constants, "POSSESSIVE_REPEAT", None))
_ONE_CHARACTER = (_constants.LITERAL, _constants.NOT_LITERAL, _constants.ANY, _constants.IN)


@functools.lru_cache(maxsize=4096)
def check_pattern(pattern: str) -> str | None:
    """Why ``pattern`` (a rank_pattern / alpha_pattern key) is refused, or None if it is accepted.

    PEFT matches the keys as regular expressions, ``re.match(rf"(.*\\.)?({key})$", module)``, with Python's
    backtracking engine, where a key such as ``(a+)+$`` takes time exponential in the module name's length.
    s3lora accepts a key only if it is at most MAX_PATTERN_CHARS characters, has no backreferences or
    conditional groups, repeats (``*``, ``+``, ``{m,n}`` with n > 1) only single characters, classes or ``.``
    (never a group, so no nested quantifiers), and has at most MAX_PATTERN_REPEATS such repetitions. With
    module names of at most MAX_MODULE_CHARS characters, one match then costs at most a few million steps.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"it is longer than {MAX_PATTERN_CHARS} characters"
    try:  # the key alone, then as PEFT compiles it: some keys fail only inside PEFT's wrapper
        _parser.parse(pattern)
        tree = _parser.parse(rf"(.*\.)?({pattern})$")
    except re.error as exc:
        return f"it is an invalid regular expression ({exc})"
    except (RecursionError, OverflowError, ValueError):
        return "it is an invalid regular expression"
    repeats = -1  # the wrapper's own ".*"
    stack = [tree]
    while stack:
        for op, arg in stack.pop():
            if op in (_constants.GROUPREF, _constants.GROUPREF_EXISTS):
                return "it uses a backreference or a conditional group"
            if op in _REPEATS:
                low, high, body = arg
                if high > 1:
                    repeats += 1
                    if not _one_character(body):
                        return "it repeats a group (a quantifier on a group, e.g. (ab)+ or (a+)*)"
                stack.append(body)
            elif op is _constants.SUBPATTERN:
                stack.append(arg[-1])
            elif op is _constants.BRANCH:
                stack.extend(arg[1])
            elif op in (_constants.ASSERT, _constants.ASSERT_NOT):
                stack.append(arg[1])
            elif op is getattr(_constants, "ATOMIC_GROUP", None):
                stack.append(arg)
    if repeats > MAX_PATTERN_REPEATS:
        return f"it has {repeats} repetitions (at most {MAX_PATTERN_REPEATS})"
    return None


def _one_character(body) -> bool:
    """Whether a parsed regex matches exactly one character: a literal, a class, '.', maybe in a group."""
    while len(body) == 1 and body[0][0] is _constants.SUBPATTERN:
        body = body[0][1][-1]
    return len(body) == 1 and body[0][0] in _ONE_CHARACTER


@functools.lru_cache(maxsize=256)
def _compiled(key: str) -> re.Pattern:
    return re.compile(rf"(.*\.)?({key})$")


def is_plain_key(key: str) -> bool:
    """Whether a pattern key is a module name as PEFT reads it: no regular-expression syntax but '.', which
    (as in PEFT's regex) matches any character but a newline."""
    return not any(c in _SPECIAL for c in key) and "\n" not in key


class PatternMatcher:
    """PEFT's ``get_pattern_key`` for one rank_pattern / alpha_pattern: the first key (in the config's order) for
    which ``re.match(rf"(.*\\.)?({key})$", module)`` matches, in time that does not grow with the number of keys.

    A key is matched at the end of the module name, starting at its beginning or just after a '.': for a plain
    key (``is_plain_key``) that is a walk of a trie of the reversed keys along the reversed name ('.' in a key
    follows any character), so all plain keys together cost about the name's length (at most MAX_TRIE_STEPS);
    the other keys, at most MAX_REGEX_KEYS, are tried as PEFT tries them. A name with a newline (where '$' and
    '.' differ) is matched the literal way, key by key.
    """

    def __init__(self, keys: list[str]) -> None:
        self.keys = list(keys)
        self._trie: dict = {}
        self._regex: list[tuple[int, str]] = []
        for index, key in enumerate(self.keys):
            if len(key) <= MAX_PATTERN_CHARS and is_plain_key(key):
                node = self._trie
                for char in reversed(key):
                    node = node.setdefault(char, {})
                node.setdefault(None, index)  # the first of equal keys wins
                continue
            problem = check_pattern(key)
            if problem is not None:
                raise AdapterInputError(
                    f"rank_pattern / alpha_pattern key {short_repr(key)} is refused: {problem}; {PATTERN_RULE}"
                )
            self._regex.append((index, key))
        if len(self._regex) > MAX_REGEX_KEYS:
            raise AdapterInputError(
                f"rank_pattern / alpha_pattern has {len(self._regex)} keys that are regular "
                f"expressions (at most {MAX_REGEX_KEYS}); module names as keys are not limited"
            )

    def match(self, module: str) -> str | None:
        """The first key that matches ``module``, or None."""
        if self.keys and len(module) > MAX_MODULE_CHARS:
            raise AdapterInputError(
                f"module name of {len(module)} characters ({module[:60]!r}...) is too long to "
                f"match rank_pattern / alpha_pattern keys against (at most {MAX_MODULE_CHARS})"
            )
        if "\n" in module:
            return next((key for key in self.keys if _compiled(key).match(module)), None)
        best = self._plain_match(module)
        for index, key in self._regex:
            if best is not None and index > best:
                break
            if _compiled(key).match(module):
                best = index
                break
        return None if best is None else self.keys[best]

    def _plain_match(self, module: str) -> int | None:
        """The smallest index of a plain key matching ``module`` (see the class)."""
        best = None
        frontier = [self._trie]
        steps = 0
        n = len(module)
        for depth in range(n + 1):
            start = n - depth  # the key would be module[start:]
            if start == 0 or module[start - 1] == ".":
                for node in frontier:
                    index = node.get(None)
                    if index is not None and (best is None or index < best):
                        best = index
            if depth == n:
                break
            char = module[start - 1]
            advanced = []
            for node in frontier:
                child = node.get(char)
                if child is not None:
                    advanced.append(child)
                if char != ".":
                    wild = node.get(".")
                    if wild is not None:
                        advanced.append(wild)
            steps += len(frontier)
            if steps > MAX_TRIE_STEPS:
                raise AdapterInputError(
                    f"rank_pattern / alpha_pattern keys take too long to match {module[:60]!r} "
                    f"(over {MAX_TRIE_STEPS} steps: many keys that differ only where they have "
                    "'.'); write them as module names or fewer regular expressions"
                )
            frontier = advanced
            if not frontier:
                break
        return best


def pattern_key(pattern_keys: list[str], module: str) -> str | None:
    """The first key of ``rank_pattern`` / ``alpha_pattern`` that matches ``module``, as PEFT's
    ``get_pattern_key`` matches it: ``re.match(rf"(.*\\.)?({key})$", module)``; None if none does.

    Raises AdapterInputError for a key that ``check_pattern`` refuses, or, when there are keys, for a module
    name longer than MAX_MODULE_CHARS (both bound the time a match can take). To match many modules, build one
    ``PatternMatcher`` (as AdapterConfig does)."""
    return PatternMatcher(pattern_keys).match(module)


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT LoRA adapter_config.json that scoring uses; ``raw`` keeps every key verbatim."""

    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: Any = None
    modules_to_save: Any = None
    base_model_name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @functools.cached_property
    def _matchers(self) -> tuple[PatternMatcher, PatternMatcher]:
        return PatternMatcher(list(self.rank_pattern)), PatternMatcher(list(self.alpha_pattern))

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """r and lora_alpha of one module, with ``rank_pattern`` / ``alpha_pattern`` applied as PEFT does."""
        rank_matcher, alpha_matcher = self._matchers
        r_key = rank_matcher.match(module)
        a_key = alpha_matcher.match(module)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.lora_alpha
        return r, alpha

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_and_alpha(module)
        return lora_scaling(alpha, r, self.use_rslora)


def _number(raw: dict, key: str, path: Path, *, integer: bool) -> Any:
    if key not in raw or raw[key] is None:
        raise AdapterInputError(f"{path}: '{key}' is missing; a LoRA adapter_config.json needs 'r' and 'lora_alpha'")
    value = raw[key]
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise AdapterInputError(f"{path}: '{key}' must be {kind}, got {short_repr(value)}")
    return value


def _pattern(raw: dict, key: str, path: Path, *, integer: bool) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterInputError(f"{path}: '{key}' must be an object mapping module patterns to values")
    for pattern, item in value.items():
        problem = None if len(pattern) <= MAX_PATTERN_CHARS and is_plain_key(pattern) else check_pattern(pattern)
        if problem is not None:
            raise AdapterInputError(f"{path}: '{key}' key {short_repr(pattern)} is refused: {problem}; {PATTERN_RULE}")
        where = f"'{key}' value for {short_repr(pattern)}"
        _number({where: item}, where, path, integer=integer)
        if item <= 0 and integer:
            raise AdapterInputError(
                f"{path}: '{key}' gives rank {item} to {short_repr(pattern)}; ranks must be positive"
            )
    return dict(value)


def _flag(raw: dict, key: str, path: Path) -> bool:
    """A boolean option; PEFT would take any truthy value (the string "false" included) as true, so only
    true, false and null (false) are accepted."""
    value = raw.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterInputError(f"{path}: '{key}' must be true or false, got {short_repr(value)}")
    return value


def _names(raw: dict, key: str, path: Path) -> Any:
    """target_modules / modules_to_save: null, a string (a regex, for PEFT's target_modules) or a list of
    strings, as PEFT's LoraConfig declares them."""
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AdapterInputError(f"{path}: '{key}' must be a string or a list of strings, got {short_repr(value)}")
    return value


def parse_config(raw: Any, path: Path) -> AdapterConfig:
    """Validate a decoded adapter_config.json (a LoRA one) and return its AdapterConfig.

    Follows PEFT's LoraConfig where that is safe; stricter where PEFT would silently misread a value: 'r' and
    'lora_alpha' are required (PEFT falls back to its defaults, 8 and 8, which would give a silently wrong
    scaling for a hand-edited config); 'r' is a positive integer (not a bool, string or float); 'lora_alpha'
    a finite number; use_rslora / use_dora / fan_in_fan_out booleans; peft_type, if present, "LORA";
    rank_pattern / alpha_pattern keys pass ``check_pattern``.
    """
    if not isinstance(raw, dict):
        raise AdapterInputError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterInputError(
            f"{path}: peft_type is {short_repr(peft_type)}; s3lora analyses LoRA adapters (peft_type 'LORA')"
        )
    r = _number(raw, "r", path, integer=True)
    if r <= 0:
        raise AdapterInputError(f"{path}: 'r' is {r}; the LoRA rank must be a positive integer")
    alpha = _number(raw, "lora_alpha", path, integer=False)
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(
        peft_type="LORA",
        r=r,
        lora_alpha=alpha,
        use_rslora=_flag(raw, "use_rslora", path),
        use_dora=_flag(raw, "use_dora", path),
        fan_in_fan_out=_flag(raw, "fan_in_fan_out", path),
        rank_pattern=_pattern(raw, "rank_pattern", path, integer=True),
        alpha_pattern=_pattern(raw, "alpha_pattern", path, integer=False),
        target_modules=_names(raw, "target_modules", path),
        modules_to_save=_names(raw, "modules_to_save", path),
        base_model_name_or_path=base if isinstance(base, str) else None,
        raw=raw,
    )


def decode_config(text: str, path: Path) -> Any:
    """json.loads of an adapter_config.json, refusing keys that appear twice in one object (PEFT would
    silently keep the last; a reviewer reading the first would be misled)."""
    pairs = unique_keys(f"{path}: ")
    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise AdapterInputError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise AdapterInputError(f"{path} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer with too many digits
        raise AdapterInputError(
            f"{path} is not valid JSON ({str(exc).splitlines()[0] if str(exc) else exc!r})"
        ) from None


def read_json(path: Path) -> Any:
    """The decoded JSON of ``path``, read with a bound (MAX_CONFIG_BYTES) from a regular file only, keys that
    appear twice in one object refused (see ``decode_config``); AdapterInputError for anything else."""
    try:
        with open_regular(path) as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise AdapterInputError(
            f"{path} not found: a PEFT adapter directory holds adapter_config.json beside its weights"
        ) from None
    except OSError as exc:
        raise AdapterInputError(f"{path}: cannot be read ({exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterInputError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterInputError(f"{path}: cannot be read ({exc})") from None
    return decode_config(text, path)


def read_config(path: Path) -> AdapterConfig:
    """Read and validate ``path`` (an adapter_config.json of at most MAX_CONFIG_BYTES)."""
    return parse_config(read_json(path), path)
