"""Write a file so that it appears whole or not at all: a temporary file in the same folder, renamed.

The file gets the usual creation mode ``0o666 & ~umask`` (``tempfile.mkstemp`` creates it 0600). For a
set of files that must appear together (``gpdc compile``'s outputs), see :mod:`gpdc.outdir`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .outdir import file_mode, writing


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path``. A full disk or a
    read-only folder is a ``GpdcError`` that names ``path``."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
