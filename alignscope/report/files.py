"""Writing results safely: alignscope's own folders, atomic files, no user data touched.

Rules every writer follows:

- A result folder (a report, a comparison, an explanation, an STN run) is
  built in a staging folder beside its destination and renamed into place,
  so a reader never sees half of it. It carries a marker file
  (:data:`MARKER`), which is how alignscope knows a folder is its own.
- An existing destination is replaced only with ``force`` *and* only if it
  is alignscope's own folder (marker, or the ``run.json`` of a report made
  before markers existed) or empty. Any other folder is refused, with or
  without ``force``: alignscope never deletes what it did not write.
- A destination that is, lies inside, or contains one of the run's inputs
  (``--images``) is refused.
- Single files (plots, CSVs) are written to a temporary name in the same
  folder and renamed, so an interrupt never leaves a truncated file.
- Files and folders get the modes the user's umask gives, like any other
  file a command writes (temporary files start private; they are opened up
  before they are renamed into place).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ..errors import ReportExistsError, UsageError

if TYPE_CHECKING:
    import pandas as pd

MARKER = ".alignscope"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_up(path: Path, directory: bool) -> None:
    """Give a private temporary file or folder the mode a normal create would have given."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def is_alignscope_folder(path: Path) -> bool:
    """Whether ``path`` is a folder alignscope wrote (marker file, or an older report's run.json)."""
    if (path / MARKER).is_file():
        return True
    run = path / "run.json"
    if run.is_file():
        try:
            return "alignscope_version" in json.loads(run.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False
    return False


def _overlaps(out: Path, inputs: Iterable[str | os.PathLike]) -> Path | None:
    target = out.resolve()
    for item in inputs:
        text = str(item)
        if any(ch in text for ch in "*?["):  # a glob: its fixed leading folder is what it reads
            text = text[: min(text.index(ch) for ch in "*?[" if ch in text)]
            text = os.path.dirname(text) or "."
        source = Path(text).resolve()
        if target == source or source in target.parents or target in source.parents:
            return Path(item)
    return None


def _probe_writable(out: Path) -> None:
    """Fail now, not after the work, when ``out`` cannot be created."""
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot write {out}: {ancestor} is a file, not a folder; choose another --out")
    try:
        Path(tempfile.mkdtemp(dir=ancestor, prefix=".alignscope-probe-")).rmdir()
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc} in {ancestor}; choose another --out") from None


def validate_destination(out: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate a result folder before any work is done (see the module rules); returns it as a Path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose another --out")
    clash = _overlaps(out, inputs)
    if clash is not None:
        raise UsageError(f"--out {out} overlaps the input {clash}; write results to a separate folder")
    if out.exists() and any(out.iterdir()):
        if not is_alignscope_folder(out):
            raise ReportExistsError(
                f"{out} is not empty and is not an alignscope result folder; alignscope never replaces other "
                "folders, even with --force: choose another --out")
        if not force:
            raise ReportExistsError(f"{out} already holds an alignscope result; pass --force to replace it or choose another --out")
        foreign = foreign_entries(out)
        if foreign:
            raise ReportExistsError(
                f"{out} holds {len(foreign)} item(s) alignscope did not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); --force would delete them: move them or choose another --out")
    _probe_writable(out)
    return out


def foreign_entries(folder: Path) -> list[str]:
    """Entries of an alignscope folder that its marker does not list (added by someone else); [] without a list."""
    try:
        listed = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list):
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in set(listed) | {MARKER})


def mark_folder(folder: Path, kind: str) -> None:
    """Write the marker that makes ``folder`` replaceable by a later ``--force``; it lists the files written so far."""
    from .._version import __version__

    files = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    write_text_atomic(folder / MARKER, json.dumps({"tool": "alignscope", "kind": kind, "version": __version__,
                                                   "files": files}) + "\n")


def record_files(folder: Path, names: Iterable[str]) -> None:
    """Add ``names`` (files alignscope just wrote into an existing alignscope folder) to its marker's list."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(marker, dict) and isinstance(marker.get("files"), list):
        marker["files"] = sorted(set(marker["files"]) | set(names))
        write_text_atomic(folder / MARKER, json.dumps(marker) + "\n")


def publish_folder(out: str | os.PathLike, write: Callable[[Path], None], force: bool, kind: str = "report",
                   inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Build a folder with ``write(staging)`` beside ``out``, mark it, then move it into place.

    The old folder (only ever an alignscope folder, see :func:`validate_destination`)
    is removed only after the new one is in place; on any failure or
    interrupt the staging folder is removed.
    """
    out = validate_destination(out, force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _open_up(staging, directory=True)
        write(staging)
        mark_folder(staging, kind)
        if out.exists():
            retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, retired / "previous")
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _open_up(tmp_path, directory=False)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# A cell a spreadsheet would run as a formula starts with one of these; numbers and lists of numbers
# ("-0.5,0.5") are left alone, they run nothing.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBERS = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(,[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)*$")


def _formula_like(value) -> bool:
    """A text cell that starts a formula, also behind apostrophes (so that the prefix can be undone exactly)."""
    return isinstance(value, str) and value.lstrip("'").startswith(_FORMULA_START) and not _NUMBERS.match(value)


def _neutralised(value):
    return "'" + value if _formula_like(value) else value


def csv_text(table: "pd.DataFrame") -> str:
    """``table`` as CSV with every text cell that would start a spreadsheet formula prefixed by ``'``.

    JSON exports keep the raw text; :func:`restore_text_cells` undoes the prefix when alignscope
    reads its own CSV back.
    """
    import pandas as pd

    safe = table.copy()
    for column in safe.columns:
        if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = safe[column].map(_neutralised)
    safe.columns = [_neutralised(str(c)) for c in safe.columns]
    return safe.to_csv(index=False)


def restore_text_cells(table: "pd.DataFrame") -> "pd.DataFrame":
    """Undo :func:`csv_text`'s prefix on the text cells of a table read back from CSV."""
    import pandas as pd

    for column in table.columns:
        if table[column].dtype == object or pd.api.types.is_string_dtype(table[column]):
            table[column] = table[column].map(
                lambda v: v[1:] if _formula_like(v) and v.startswith("'") else v)
    return table
