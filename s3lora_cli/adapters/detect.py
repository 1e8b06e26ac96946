"""Finding adapters on disk and telling their formats apart: PEFT, kohya-ss / LyCORIS, diffusers and MLX-LM, by
file names, config fields and tensor-name patterns; and the path rules every reader follows (no symlink out of
the adapter directory, except a Hugging Face cache snapshot's links into its own ``blobs/``); and what a user's
adapter argument names: a path, a file of an adapter standing for its directory, or a Hub id in the local cache."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from s3lora_cli.adapters.config import CONFIG_NAME, read_json
from s3lora_cli.errors import AdapterInputError, UsageError

FORMATS = ("peft", "kohya", "diffusers", "mlx")
"""The adapter formats s3lora reads, as ``--input-format`` names them (``auto`` detects)."""

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MLX_WEIGHTS = "adapters.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
HF_CACHE_PREFIXES = ("models--", "datasets--", "spaces--")
FULL_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Files of a full model checkpoint as transformers saves it (with config.json)."""

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_FULL_MODEL_NOTE = (
    "this is a full model, not a LoRA adapter: s3lora audits the adapter that LoRA fine-tuning "
    "saves (PEFT's adapter_config.json + adapter_model.safetensors, or a kohya, diffusers or MLX-LM "
    "LoRA file)"
)

_KOHYA = re.compile(
    r"^lora_(?:unet|te\d?)_|\.(?:lora_down|lora_up)\.weight$"
    r"|\.(?:hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$"
)
_DIFFUSERS = re.compile(r"^(?:unet|transformer|text_encoder(?:_\d)?|prior|controlnet)\.")
_MLX = re.compile(r"\.lora_[ab]$")
_PEFT = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B)(?:\.[^.]+)?\.(?:weight|bias)$|\.lora_magnitude_vector")


def check_format_name(input_format: str | None) -> str | None:
    """``input_format`` validated: None for auto-detection, else one of FORMATS."""
    if input_format is None or input_format == "auto":
        return None
    if input_format not in FORMATS:
        raise UsageError(f"--input-format {input_format!r}: expected auto, {', '.join(FORMATS)}")
    return input_format


def check_adapter_name(name: str | None) -> str | None:
    """An ``--adapter`` name is one directory name: no separators, no ``..``, not absolute, not hidden."""
    if name is None:
        return None
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith(".")
        or os.path.isabs(name)
    ):
        raise UsageError(
            f"--adapter {name!r}: expected the name of one adapter (a PEFT adapter_name, as its "
            "subdirectory is named), without path separators or '..'"
        )
    return name


def hf_cache_blobs(directory: Path) -> Path | None:
    """``<repo>/blobs`` when ``directory`` is (in) a Hugging Face cache snapshot ``<repo>/snapshots/<revision>``."""
    directory = Path(os.path.abspath(directory))
    for folder in (directory, *directory.parents):
        repo = folder.parent.parent
        if folder.parent.name == "snapshots" and repo.name.startswith(HF_CACHE_PREFIXES):
            return repo / "blobs" if (repo / "blobs").is_dir() else None
    return None


def check_confined(path: Path, directory: Path) -> Path:
    """Refuse ``path`` (a file or folder in ``directory``) when it is, or passes through, a symlink that leads
    outside ``directory``. In a Hugging Face cache snapshot, links into the same repository's ``blobs/`` are
    what the cache is made of and are allowed. Returns ``path``."""
    root = directory.resolve()
    target = path.resolve()
    if target == root or root in target.parents:
        return path
    blobs = hf_cache_blobs(directory)
    if blobs is not None and blobs.resolve() in target.parents:
        return path
    raise AdapterInputError(
        f"{path} is a symlink leading outside the adapter directory {directory} (to {target}); "
        "refused: copy the file into the adapter directory, or point s3lora at its real location"
    )


def resolve_snapshot(path: Path) -> Path:
    """A Hugging Face cache repository folder (``models--org--name``) stands for its snapshot: the one
    ``refs/main`` names, else the only one; any other path is returned as it is."""
    if not (path.is_dir() and path.name.startswith(HF_CACHE_PREFIXES) and (path / "snapshots").is_dir()):
        return path
    ref = path / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text(encoding="utf-8", errors="replace").strip()
        if re.fullmatch(r"[0-9a-fA-F]{7,64}", revision) and (path / "snapshots" / revision).is_dir():
            return path / "snapshots" / revision
    snapshots = sorted(p.name for p in (path / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) == 1:
        return path / "snapshots" / snapshots[0]
    raise AdapterInputError(
        f"{path}: a Hugging Face cache folder with {len(snapshots)} snapshots "
        f"({', '.join(snapshots) or 'none'}) and no refs/main; point s3lora at one of "
        f"{path / 'snapshots'}/<revision>"
    )


def classify_keys(keys: Iterable[str]) -> set[str]:
    """The formats whose tensor names appear among ``keys`` (several when the names are ambiguous)."""
    found = set()
    for key in keys:
        if _KOHYA.search(key):
            found.add("kohya")
        elif _DIFFUSERS.match(key) and (".lora" in key or key.endswith(".alpha")):
            found.add("diffusers")
        elif _MLX.search(key):
            found.add("mlx")
        elif _PEFT.search(key):
            found.add("peft")
    return found


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (no tensor is read)."""
    from s3lora_cli.adapters.safetensors_io import SafetensorsSource

    source = SafetensorsSource(path)
    try:
        return list(source.keys)
    finally:
        source.close()


def _config_kind(config: Path) -> str | None:
    """ "mlx" for an MLX-LM adapter_config.json (``lora_parameters`` / ``fine_tune_type``), "peft" for PEFT's."""
    try:
        raw = read_json(config)
    except AdapterInputError:  # bounded read; not JSON, not a file, too large, nested too deeply
        return None
    if not isinstance(raw, dict):
        return None
    if "lora_parameters" in raw or "fine_tune_type" in raw:
        return "mlx"
    if "peft_type" in raw or "lora_alpha" in raw:
        return "peft"
    return None


def _nested_peft(directory: Path) -> list[str]:
    return sorted(
        sub.name for sub in directory.iterdir() if sub.is_dir() and not sub.name.startswith(".") and _is_peft_dir(sub)
    )


def _is_peft_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and any((path / name).is_file() for name in PEFT_WEIGHTS)


def _is_mlx_dir(path: Path) -> bool:
    return (path / MLX_WEIGHTS).is_file() and (path / CONFIG_NAME).is_file()


def _directory_format(path: Path) -> str:
    if _is_peft_dir(path) and _config_kind(path / CONFIG_NAME) != "mlx":
        return "peft"
    if _is_mlx_dir(path):
        return "mlx"
    if (path / DIFFUSERS_WEIGHTS).is_file():
        return "diffusers"
    if _nested_peft(path):
        return "peft"
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if (path / "config.json").is_file() and any((path / name).is_file() for name in FULL_MODEL_FILES):
        raise AdapterInputError(f"{path}: {_FULL_MODEL_NOTE}")
    if len(files) == 1:
        return _file_format(files[0])
    found = ", ".join(p.name for p in files) or "no adapter weights"
    raise AdapterInputError(
        f"{path}: cannot tell which adapter this is (found {found}); expected a PEFT directory "
        f"(adapter_config.json + adapter_model.safetensors), an MLX-LM one ({MLX_WEIGHTS} + "
        f"{CONFIG_NAME}), a diffusers one ({DIFFUSERS_WEIGHTS}) or a single .safetensors file; "
        "point s3lora at the weights file, or pass --input-format"
    )


def _file_format(path: Path) -> str:
    config = path.parent / CONFIG_NAME
    if path.suffix == ".bin":  # a pickle is not opened to guess: by name only
        return "diffusers" if path.name == DIFFUSERS_WEIGHTS.replace(".safetensors", ".bin") else "peft"
    if path.suffix != ".safetensors":
        raise AdapterInputError(f"{path}: expected an adapter directory or a .safetensors / .bin weights file")
    if path.name in PEFT_WEIGHTS and config.is_file() and _config_kind(config) != "mlx":
        return "peft"
    if path.name.endswith(MLX_WEIGHTS) and config.is_file() and _config_kind(config) == "mlx":
        return "mlx"
    keys = safetensors_keys(path)
    found = classify_keys(keys)
    if found == {"mlx"} and not (config.is_file() and _config_kind(config) == "mlx"):
        raise AdapterInputError(
            f"{path}: MLX-LM tensor names (.lora_a / .lora_b) but no MLX-LM {CONFIG_NAME} beside "
            "it (lora_parameters gives the rank and scale); put it beside the weights"
        )
    if len(found) == 1:
        return found.pop()
    if not found:
        sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        if any(key.endswith(".weight") for key in keys):
            raise AdapterInputError(
                f"{path}: {_FULL_MODEL_NOTE}; its {len(keys)} tensors ({sample}) hold no LoRA "
                f"factors (if it is a LoRA adapter in another layout, pass --input-format)"
            )
        raise AdapterInputError(
            f"{path}: no LoRA tensor names that s3lora knows among {len(keys)} tensors "
            f"({sample or 'none'}); if it is a LoRA adapter, pass --input-format "
            f"({', '.join(FORMATS)})"
        )
    raise AdapterInputError(
        f"{path}: ambiguous tensor names, they look like {' and '.join(sorted(found))}; "
        "pass --input-format to say which"
    )


def detect_format(path: Path) -> str:
    """The format of the adapter at ``path`` (a directory or a weights file): one of FORMATS."""
    if not path.exists():
        raise AdapterInputError(f"{path}: no such file or directory")
    path = resolve_snapshot(path)
    return _directory_format(path) if path.is_dir() else _file_format(path)


def hub_cache_dir() -> Path:
    """Where the Hugging Face Hub caches repositories: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (as huggingface_hub resolves it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot of Hub repository ``repo_id`` (``org/name``) at ``revision`` (a branch or tag named
    under ``refs/``, or a commit; default main), read from the local cache; nothing is downloaded."""
    cache = hub_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    wanted = revision or "main"
    download = (
        f"download it first (huggingface-cli download {repo_id}"
        + (f" --revision {revision}" if revision else "")
        + "), or pass its local directory"
    )
    if not (repo / "snapshots").is_dir():
        raise AdapterInputError(
            f"{repo_id}: not a local path, and the Hugging Face Hub id is not in the cache {cache}; {download}"
        )
    ref = repo / "refs" / wanted
    commit = ref.read_text(encoding="utf-8", errors="replace").strip() if ref.is_file() else wanted
    snapshot = repo / "snapshots" / commit
    if not re.fullmatch(r"[0-9a-fA-F]{7,64}", commit) or not snapshot.is_dir():
        cached = sorted(p.name for p in (repo / "snapshots").iterdir() if p.is_dir())
        raise AdapterInputError(
            f"{repo_id}: revision {wanted} is not in the cache {cache} (cached snapshots: "
            f"{', '.join(cached) or 'none'}); {download}"
        )
    return snapshot


def resolve_adapter_path(spec: str | Path, revision: str | None = None) -> Path:
    """What an adapter argument names: an existing path (a file of a PEFT, MLX-LM or diffusers adapter that is
    not its weights, such as its adapter_config.json, stands for the adapter's directory), else a Hugging Face
    Hub id ``org/name`` resolved from the local cache at ``revision``."""
    path = Path(spec)
    if path.exists():
        if revision is not None:
            raise UsageError(f"--revision applies to a Hugging Face Hub id (org/name); {path} is a local path")
        folder = path.parent
        if (
            path.is_file()
            and path.suffix not in (".safetensors", ".bin")
            and (_is_peft_dir(folder) or _is_mlx_dir(folder) or (folder / DIFFUSERS_WEIGHTS).is_file())
        ):
            return folder
        return path
    if _HUB_ID.fullmatch(str(spec)) and not str(spec).startswith("."):
        return resolve_hub_id(str(spec), revision)
    raise AdapterInputError(f"{path}: no such file or directory")


def find_adapters(root: Path) -> list[Path]:
    """Every adapter under ``root`` (``root`` itself included), recursively, sorted by path.

    Directories: PEFT (adapter_config.json + adapter_model.safetensors or .bin; a non-default adapter in
    ``<dir>/<adapter_name>/`` is one more), MLX-LM (adapter_config.json with lora_parameters + adapters.safetensors)
    and diffusers (pytorch_lora_weights.safetensors). Files: any other .safetensors file whose tensor names are
    kohya-ss / LyCORIS or diffusers LoRA names. Symlinked folders are not followed, so a link cycle cannot loop;
    a Hugging Face cache folder is found through its snapshots.
    """
    root = Path(root)
    if not root.exists():
        raise AdapterInputError(f"{root}: no such file or directory")
    if not root.is_dir():
        return [root]
    found = []
    for current, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "blobs")
        here = Path(current)
        if _is_peft_dir(here) and _config_kind(here / CONFIG_NAME) != "mlx":
            found.append(here)
            continue  # its own files are the adapter; named adapters in subfolders are walked into
        if _is_mlx_dir(here) or (here / DIFFUSERS_WEIGHTS).is_file():
            found.append(here)
            dirs[:] = []
            continue
        for name in sorted(files):
            file = here / name
            if name.endswith(".safetensors") and file.is_file():
                try:
                    kinds = classify_keys(safetensors_keys(file))
                except AdapterInputError:
                    continue
                if len(kinds) == 1 and kinds <= {"kohya", "diffusers"}:
                    found.append(file)
    return sorted(found)
