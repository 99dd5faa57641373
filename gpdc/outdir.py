"""Output folders whose files appear together or not at all (``gpdc compile --out DIR``).

Every file of a run is written into a staging folder created beside ``DIR`` (same parent, so that
no rename crosses a file system), named ``.DIR.gpdc-tmp-XXXXXXXX``. When the run has written all of
them, the staging folder is swapped in:

* with Linux ``renameat2(RENAME_EXCHANGE)`` (through ctypes) when the C library and the file
  system have it: one atomic exchange of the two folders, after which the old one (now under the
  staging name) is deleted;
* otherwise the old ``DIR`` is renamed aside (``.DIR.gpdc-old-XXXXXXXX``), the staging folder is
  renamed to ``DIR`` (on failure the old one is renamed back) and the old one is deleted.

Until the swap, the previous outputs in ``DIR`` are untouched; a run that fails or is interrupted
(SIGINT, SIGTERM: handlers installed for the duration of the run turn them into
``KeyboardInterrupt`` / :class:`Terminated`, so every ``finally`` runs) removes its staging folder
and leaves ``DIR`` as it was. SIGINT and SIGTERM are blocked while the folders are swapped and while
temporary folders are deleted, so an interrupt cannot land half-way; it is delivered right after.
Only SIGKILL or a power cut can leave a ``.DIR.gpdc-tmp-*`` / ``.DIR.gpdc-old-*`` folder behind
(delete it by hand; gpdc never deletes folders it did not create in this run).

Files in an existing ``DIR`` that gpdc did not write (anything other than ``OWN_FILES``: notes,
training logs, checkpoints, sub-folders) are kept: right after the swap, with signals still
blocked, they are renamed from the old folder into the new one, before the old folder is deleted.
(They are renamed, not copied: same inode, same mode and owner, no extra space. A file added to
``DIR`` by another program while a run is in progress is kept the same way.) If one cannot be moved,
the old folder is kept and the error names it.

Files get the usual creation mode ``0o666 & ~umask`` and a new folder ``0o777 & ~umask``
(``tempfile`` creates 0600 / 0700); a folder that replaces an existing ``DIR`` keeps ``DIR``'s mode.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import GpdcError

OWN_FILES = ("teacher.safetensors", "student.safetensors", "student.onnx", "report.json")

#: errors that mean "this disk/folder cannot take the file": the user's to fix, not a gpdc bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EFBIG}
_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class Terminated(SystemExit):
    """Raised by the SIGTERM handler of :func:`signals_raise`; exit code 143 (128 + SIGTERM)."""

    def __init__(self) -> None:
        super().__init__(128 + int(getattr(signal, "SIGTERM", 15)))


def umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _free_bytes(folder: Path | str) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def write_error_reason(e: BaseException, folder: Path | str | None = None) -> str | None:
    """The OS's reason when ``e`` means the file system refused a write (full, quota, read-only,
    permissions), else None. Also recognises errors that only carry it in their message
    (safetensors' ``SafetensorError: ... No space left on device (os error 28)``) and, given the
    ``folder`` written to, writers that lose the errno (onnx's ``OSError: N requested and 0 written``)
    on a file system that is out of space."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return e.strerror or os.strerror(e.errno)
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        if os.strerror(code) in text or f"os error {code})" in text:
            return os.strerror(code)
    if folder is not None:
        free = _free_bytes(folder)
        if free is not None and (free == 0 or isinstance(e, OSError) and free < 1 << 20):
            return os.strerror(errno.ENOSPC)
    return None


@contextmanager
def writing(path: Path | str, shown: Path | str | None = None) -> Iterator[None]:
    """Turn a refused write of ``path`` into a ``GpdcError`` naming ``shown`` (default ``path``)."""
    try:
        yield
    except Exception as e:
        reason = write_error_reason(e, Path(path).parent)
        if reason is None:
            raise
        hint = ("free some space or choose another --out" if "space" in reason.lower() or "quota" in reason.lower()
                else "choose a writable --out")
        raise GpdcError(f"cannot write {shown or path}: {reason}; {hint}.") from None


@contextmanager
def blocked_signals() -> Iterator[None]:
    """SIGINT and SIGTERM held back (delivered when the block ends) in the main thread."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def signals_raise() -> Iterator[None]:
    """For the duration: SIGINT raises ``KeyboardInterrupt`` and SIGTERM raises :class:`Terminated`, so
    ``finally`` blocks run (SIGTERM's default would end the process on the spot). Signals that were
    ignored stay ignored; the previous handlers come back afterwards. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated()

    previous = {}
    try:
        for s in _SIGNALS:
            previous[s] = signal.getsignal(s)
            if previous[s] is not signal.SIG_IGN:
                signal.signal(s, on_signal)
        yield
    finally:
        with blocked_signals():  # a signal that arrives now is handled by the restored handler
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rmtree(path: Path | None) -> None:
    if path is not None and os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


class StagedDir:
    """The staging folder of one run. Use as a context manager around the whole run (it installs the
    signal handlers and removes what is left on exit), call :meth:`open` once the input is validated,
    write into :attr:`path`, then :meth:`commit`."""

    def __init__(self, own_files: tuple[str, ...] = OWN_FILES):
        self.own_files = own_files
        self.final: Path | None = None  # the real (resolved) DIR
        self.shown: Path | None = None  # DIR as the user wrote it
        self.path: Path | None = None  # the staging folder

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "StagedDir":
        self._signals = signals_raise()
        self._signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        with blocked_signals():  # a second Ctrl-C cannot cut the clean-up short
            try:
                self.discard()
            finally:
                self._signals.__exit__(*exc)

    # -- steps ----------------------------------------------------------------------------------
    def open(self, out: Path | str) -> Path:
        """Check that ``out`` can be written and create the staging folder beside it."""
        self.shown = Path(out)
        final = Path(os.path.realpath(out))  # a symlinked DIR: replace the folder it points to
        self.final = final
        where = f"the output folder {self.shown}"
        if final.exists() and not final.is_dir():
            raise GpdcError(f"{where} is a file, not a folder; pass a folder (new or gpdc's own) with --out.")
        cwd = Path(os.path.realpath(os.getcwd()))
        if final == cwd or final in cwd.parents or os.path.ismount(final):
            what = "a mount point" if os.path.ismount(final) else "the current folder or one that contains it"
            raise GpdcError(f"{where} is {what}; gpdc replaces its output folder as a whole (keeping files it did not "
                            "write), so give it a folder of its own, e.g. --out out/model.")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_dir() and not os.access(final, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            mode = stat.S_IMODE(final.stat().st_mode) if final.is_dir() else dir_mode()
            with blocked_signals():  # created and recorded together, so it is always cleaned up
                self.path = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.gpdc-tmp-"))
            os.chmod(self.path, mode)
        except OSError as e:
            raise GpdcError(f"cannot write to {where} ({e.strerror or e}); pass a writable folder with --out.") from None
        return self.path

    def writing(self, name: str):
        """Context for writing ``name`` into the staging folder: a full disk or a read-only folder
        becomes a ``GpdcError`` that names the file at its final place."""
        return writing(self.path / name, (self.shown or Path(".")) / name)

    def write(self, name: str, write: Callable[[str], None]) -> Path:
        """``write(path)`` for ``name`` in the staging folder, with :meth:`writing`'s errors."""
        target = self.path / name
        with self.writing(name):
            write(str(target))
        return target

    def commit(self) -> None:
        """Swap the staging folder in as ``DIR`` (see the module docstring)."""
        assert self.path is not None and self.final is not None, "open() first"
        mode = file_mode()
        for name in self.own_files:
            p = self.path / name
            if p.is_file():
                os.chmod(p, mode)
        final, staging = self.final, self.path
        with blocked_signals():
            if not os.path.lexists(final):
                try:
                    os.rename(staging, final)
                    self.path = None
                    return
                except OSError as e:
                    if not os.path.isdir(final):  # anything but "someone created DIR meanwhile"
                        raise GpdcError(f"cannot create the output folder {self.shown}: {e.strerror}.") from None
            try:
                if _rename_exchange(staging, final):
                    old, self.path = staging, None
                else:
                    old = final.parent / f".{final.name}.gpdc-old-{secrets.token_hex(4)}"
                    os.rename(final, old)
                    try:
                        os.rename(staging, final)
                    except OSError:
                        try:
                            os.rename(old, final)
                        except OSError:
                            raise GpdcError(f"could not replace the output folder {self.shown}; the previous one is "
                                            f"now {old}: rename it back by hand.") from None
                        raise
                    self.path = None
            except OSError as e:
                raise GpdcError(f"cannot replace the output folder {self.shown} ({e.strerror or e}); "
                                "check that it is writable and not in use, or choose another --out.") from None
            # the previous folder is now `old`: move the user's files over, then delete it
            kept = []
            try:
                entries = sorted(os.listdir(old))
            except OSError as e:
                entries, kept = [], [f"(cannot list: {e.strerror})"]
            for entry in entries:
                if entry in self.own_files:
                    continue
                try:
                    os.rename(old / entry, final / entry)
                except OSError as e:
                    kept.append(f"{entry} ({e.strerror})")
            if kept:  # keep the old folder: it still holds files of the user
                raise GpdcError(f"the new outputs are in {self.shown}, but these files of yours could not be moved "
                                f"into it from the previous folder, kept as {old}: {', '.join(kept[:10])}; "
                                "move them yourself.")
            _rmtree(old)

    def discard(self) -> None:
        """Remove the staging folder if it was not swapped in (a previous ``DIR`` is never deleted here)."""
        with blocked_signals():
            _rmtree(self.path)
            self.path = None
