"""Finding the adapters of a store: every adapter under a directory, and paths relative to the store's root."""

from __future__ import annotations

from pathlib import Path

from s3lora_cli.adapters import find_adapters
from s3lora_cli.errors import AdapterInputError


def discover(root: str | Path) -> list[Path]:
    """Every adapter under ``root``, sorted by path; hidden directories (the cache, temporary directories of an
    interrupted admit) are skipped."""
    root = Path(root)
    if not root.exists():
        raise AdapterInputError(f"{root}: no such file or directory")
    found = []
    for path in find_adapters(root):
        rel = relative(path, root)
        if not any(part.startswith(".") and part not in (".", "..") for part in Path(rel).parts):
            found.append(path)
    return found


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with POSIX separators ("." for the root itself; as given when outside it)."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return Path(path).as_posix()
    return rel.as_posix() if rel.parts else "."


def inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies under it, symlinks resolved."""
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents
