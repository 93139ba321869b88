"""Writing outputs without ever losing data, and stopping cleanly on Ctrl-C.

- ``check_output`` refuses to write onto or into an input (symlinks and relative paths resolved), over an
  existing path without ``overwrite``, or over a folder holding files calofm did not write.
- ``Staging`` builds outputs in a hidden temporary folder beside them and moves them into place only when
  everything is complete; on an error or Ctrl-C it removes the temporary folder and any folder it created,
  so nothing is left behind and an existing output stays as it was.
- ``atomic_folder`` / ``write_text_atomic``: the folders and files calofm names itself (models, checkpoints, logs)
  are written under a temporary name and renamed when complete.
- ``catch_interrupts`` / ``check_interrupted``: h5py raises a Ctrl-C that arrives while it frees objects
  inside a weakref callback, where Python prints it as "Exception ignored" and carries on (a conversion
  then ran to the end). The handler also remembers the Ctrl-C; the chunk loops call ``check_interrupted``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from calofm.data.format import ShowerFileError

PARQUET_NAMES = re.compile(r"^(data-\d{5}-of-\d{5}\.parquet|calofm\.json)$")  # what `convert --to parquet` writes


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_output(dst: str | Path, inputs=(), overwrite: bool = False, kind: str = "file") -> Path:
    """Check that ``dst`` may be written; ``kind`` is ``file``, ``parquet`` (a folder replaced as a whole),
    ``report`` (a folder whose files are added or replaced) or ``run`` (a training run folder: it may exist, to
    resume, but holds no input). Returns ``dst`` as a Path."""
    dst = Path(dst)
    real = _real(dst)
    for src in inputs:
        src_real = _real(src)
        if real == src_real or (dst.exists() and Path(src).exists() and os.path.samefile(dst, src)):
            raise ShowerFileError(dst, f"is the input {src}; choose another output")
        if src_real in real.parents:
            raise ShowerFileError(dst, f"is inside the input folder {src}; choose another output")
        if real in src_real.parents and kind != "report":
            raise ShowerFileError(dst, f"holds the input {src}; writing there would replace it")
    if not (dst.exists() or dst.is_symlink()):
        return dst
    if kind == "file":
        if dst.is_dir():
            raise ShowerFileError(dst, "is a folder; give a file name for the output")
        if not overwrite:
            raise ShowerFileError(dst, "exists already (use --overwrite to replace it)")
        return dst
    if not dst.is_dir():
        raise ShowerFileError(dst, "exists and is not a folder")
    if kind == "parquet":
        if not overwrite:
            raise ShowerFileError(dst, "exists already (use --overwrite to replace it)")
        foreign = sorted(p.name for p in dst.iterdir() if not PARQUET_NAMES.match(p.name))
        if foreign:
            raise ShowerFileError(dst, f"holds files calofm did not write ({', '.join(foreign[:3])}); "
                                       "not replacing it, even with --overwrite")
    return dst


class Staging:
    """``with Staging(folder) as st:`` write into ``st.tmp``, then ``st.place(tmp_path, final)`` for each output.

    The moves happen when the block ends without an error; otherwise nothing is moved. The temporary
    folder is always removed, and so are the folders created for the output when the block fails.
    """

    def __init__(self, folder: str | Path, name: str = "output", inputs=()):
        self.folder = Path(folder)
        self.name = name
        self.inputs = {_real(p) for p in inputs}  # never replaced, whatever the moves say
        self.tmp: Path | None = None
        self._created: list[Path] = []
        self._moves: list[tuple[Path, Path, str]] = []

    def __enter__(self) -> Staging:
        missing = []
        d = self.folder.absolute()
        while not d.exists():
            missing.append(d)
            d = d.parent
        if not d.is_dir():
            raise ShowerFileError(self.folder, f"cannot create the output folder: {d} is not a folder")
        try:
            for m in reversed(missing):
                m.mkdir()
                self._created.append(m)
            self.tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{self.name}.", suffix=".partial"))
        except OSError as err:
            self._remove_created()
            raise ShowerFileError(self.folder, f"cannot write here ({err.strerror or err})") from None
        return self

    def place(self, tmp: Path, final: str | Path, how: str = "file") -> None:
        """Move ``tmp`` to ``final`` at the end: ``file`` (replacing a file), ``folder`` (replacing a folder
        as a whole) or ``merge`` (a folder's files added to, or replacing those in, an existing folder)."""
        self._moves.append((Path(tmp), Path(final), how))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                check_interrupted()  # a Ctrl-C that h5py swallowed inside the block: nothing is moved
                for tmp, final, how in self._moves:
                    for target in _targets(tmp, final, how):
                        if _real(target) in self.inputs or any(i in _real(target).parents for i in self.inputs):
                            raise ShowerFileError(target, "is an input; not replacing it")
                for tmp, final, how in self._moves:
                    _move(tmp, final, how, self.tmp / ".replaced")  # removed with the temporary folder
        except BaseException:
            self._cleanup(failed=True)
            raise
        self._cleanup(failed=exc_type is not None)

    def _cleanup(self, failed: bool) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if failed:
            self._remove_created()

    def _remove_created(self) -> None:
        for d in reversed(self._created):
            try:
                d.rmdir()  # only if empty: never remove what someone else put there meanwhile
            except OSError:
                break
        self._created.clear()


def _targets(tmp: Path, final: Path, how: str):
    """The existing paths a move would replace."""
    if how == "merge":
        for item in tmp.iterdir():
            yield from _targets(item, final / item.name, "merge" if item.is_dir() else "file")
    elif final.exists() or final.is_symlink():
        yield final


def _move(tmp: Path, final: Path, how: str, aside: Path) -> None:
    """Move ``tmp`` to ``final``; a folder it replaces is first moved to ``aside`` (removed by the caller)."""
    if how == "file":
        os.replace(tmp, final)
    elif how == "folder":
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
    elif how == "merge":
        final.mkdir(exist_ok=True)
        for item in tmp.iterdir():
            _move(item, final / item.name, "merge" if item.is_dir() else "file", aside)
    else:
        raise ValueError(f"unknown move {how!r}")


# ----------------------------------------------------------------------------------------------
# Files and folders calofm owns (models, checkpoints, logs): replaced whole or not at all
# ----------------------------------------------------------------------------------------------


def partial_path(path: str | Path) -> Path:
    """``<path>.partial``: where a file or folder is written before it is renamed to ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Through a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def atomic_folder(final: str | Path):
    """Yield ``<final>.partial`` to write into; on success it replaces ``final`` (an older folder of that name
    is removed only then), on any error or Ctrl-C it is removed and ``final`` is left as it was.

    For folders calofm owns and names itself (a model, a checkpoint); user-named outputs go through ``Staging``.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ValueError(f"{final}: exists and is not a folder")
    tmp = partial_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover of an interrupted save
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    _move(tmp, final, "folder", old)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------------------------

_interrupted = threading.Event()


def _on_sigint(signum, frame):
    _interrupted.set()
    raise KeyboardInterrupt


def _quiet_unraisable(previous):
    """Python's report of a swallowed KeyboardInterrupt ("Exception ignored in ...", a traceback) is noise
    here: the Ctrl-C is remembered and raised at the next check. Everything else is reported as before."""

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)

    return hook


@contextmanager
def catch_interrupts():
    """Within the block, Ctrl-C raises KeyboardInterrupt as usual and is remembered for ``check_interrupted``.

    Nests; a no-op outside the main thread and where Ctrl-C is ignored (background jobs)."""
    previous = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread() or previous is _on_sigint
            or previous is signal.SIG_IGN):
        yield
        return
    signal.signal(signal.SIGINT, _on_sigint)
    previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable(sys.unraisablehook)
    try:
        yield
        check_interrupted()  # never lose a Ctrl-C that was swallowed after the last check
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        _interrupted.clear()


def check_interrupted() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that was swallowed since it arrived (see the module docstring)."""
    if _interrupted.is_set():
        _interrupted.clear()
        raise KeyboardInterrupt
