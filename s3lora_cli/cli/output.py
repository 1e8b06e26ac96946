"""Where a command's output goes: its artifact to stdout, or to a file (``-o``) written atomically through
``durable`` (a temporary file beside it, fsynced, renamed; never over an existing file without ``--force``);
progress bars, summaries and warnings to stderr. Rich is imported only when something is drawn."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, TypeVar

from s3lora_cli.durable import write_file_atomic
from s3lora_cli.errors import UsageError

F = TypeVar("F")


def check_output(output: Optional[Path], force: bool) -> None:
    """Refuse, before any work, an output file that exists (without --force) or is a directory."""
    if output is not None and output.is_dir():
        raise UsageError(f"{output} is a directory; -o takes a file name")
    if output is not None and output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")


def write_output(data: str | bytes, output: Optional[Path], force: bool) -> None:
    """Write ``data`` to stdout, or atomically to ``output`` (temp file beside it, fsynced, then renamed)."""
    if output is None:
        sys.stdout.write(data if isinstance(data, str) else data.decode("utf-8"))
        sys.stdout.flush()
        return
    check_output(output, force)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:  # without --force, also a file that appeared while the command ran is never replaced
        write_file_atomic(output, lambda fh: fh.write(payload), replace=force)
    except FileExistsError:
        raise UsageError(f"{output} exists; pass --force to overwrite it") from None


@dataclass(frozen=True)
class Target:
    """The output of one command: ``path`` None is stdout; ``force`` allows replacing a file that exists."""

    path: Optional[Path] = None
    force: bool = False

    def check(self) -> None:
        """Refuse, before any work, what ``write`` would refuse."""
        check_output(self.path, self.force)

    def width(self) -> int | None:
        """The width a table is laid out for: the terminal's on stdout, none (full rows) in a file."""
        return table_width() if self.path is None else None

    def write(self, data: str | bytes) -> None:
        write_output(data, self.path, self.force)

    def render(self, fmt: F, renderers: Mapping[F, Callable[[], str]]) -> None:
        """Write what the renderer of ``fmt`` returns."""
        self.write(renderers[fmt]())

    @contextmanager
    def stream(self) -> Iterator[IO[str]]:
        """A text handle for output written piece by piece (JSON lines): stdout itself, or a buffer written to
        the file, atomically, once the block completes (an interrupted block writes nothing)."""
        if self.path is None:
            yield sys.stdout
            sys.stdout.flush()
            return
        self.check()
        buffer = io.StringIO()
        yield buffer
        self.write(buffer.getvalue())


def check_apart(outputs: dict[str, Optional[Path]], inputs: list[Path]) -> None:
    """Refuse an output that is, or resolves (through symlinks) to, an input adapter's file, or that lies inside
    an input adapter's directory; and two output options naming one file. ``outputs``: option -> path (None: not
    given); ``inputs``: the adapters as given (a directory, or a weights file whose config lies beside it)."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        target = Path(os.path.abspath(path)).resolve()
        if target in seen:
            raise UsageError(f"{option} {path} is also {seen[target]}; give each output its own file")
        seen[target] = option
        for adapter in inputs:
            _check_not_inside(option, path, target, adapter)


def _check_not_inside(option: str, path: Path, target: Path, adapter: Path) -> None:
    if not os.path.lexists(adapter):
        return
    source = Path(adapter).resolve()
    files = [source, source.parent / "adapter_config.json"] if source.is_file() else []
    if target in files or (source.is_dir() and (target == source or source in target.parents)):
        resolved = f" (it resolves to {target})" if target != Path(os.path.abspath(path)) else ""
        raise UsageError(
            f"{option} {path} is a file of the input adapter {adapter}{resolved}; the input is never written to: "
            "give another path"
        )


# --- stderr ------------------------------------------------------------------------------------------------


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def escape(text: str) -> str:
    """Rich's markup escape, imported when a command prints (help never loads Rich)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, in bold red on a terminal."""
    stderr_console().print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def print_summary(lines: Iterable[str]) -> None:
    """Summary and warning lines to stderr: each one line, or, on a terminal, wrapped at its width between words."""
    import shutil
    import textwrap

    width = shutil.get_terminal_size().columns if sys.stderr.isatty() else None
    for line in lines:
        wrapped = textwrap.wrap(line, width, subsequent_indent="  ", break_long_words=False) if width else [line]
        sys.stderr.write("\n".join(wrapped or [""]) + "\n")
    sys.stderr.flush()


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Callable[[int, int, Any], None] | None]:
    """A Rich progress bar on stderr, when stderr is a terminal; yields the callback score_adapter calls after
    each layer (None: no bar)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, TextColumn("{task.description}"), console=stderr_console(), transient=True)
    with bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, layer: Any) -> None:
            bar.update(task, completed=done, total=total, description=layer.module)

        yield update


def table_width() -> int | None:
    """The width tables are laid out for: $COLUMNS when set, else the terminal's width when stdout is a
    terminal, else None (a pipe or a file gets full rows)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        import shutil

        return shutil.get_terminal_size().columns
    return None
