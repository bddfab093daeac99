"""Reading spec files: what `plait check FILE` and `use "PATH"` may open.

A spec file is UTF-8 text of at most MAX_SPEC_BYTES. `use` is stricter, because a spec names the
path, not the user: only a relative path to a regular `*.plait` file (also after following links),
found next to the including file or in a directory of the search path (PLAIT_PATH, then the spec
library). A device, a FIFO or /proc file is never opened for reading, and an error about a file
that is not a spec never quotes its contents.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable, Optional

from plait.ir.errors import SpecError

SPEC_SUFFIX = ".plait"
MAX_SPEC_BYTES = 1 << 20  # 1 MiB: the largest library spec is ~1.3 KB
SEARCH_PATH_ENV = "PLAIT_PATH"
LIBRARY = Path(__file__).resolve().parents[2] / "specs"  # the spec library of a source checkout

Fail = Callable[[str, Optional[str]], SpecError]  # (message, hint) -> a located error


def read_spec_file(path: str) -> str:
    """The text of a spec file named on the command line (any name; pipes are fine: the user chose
    them), refused when it is a directory, too large or not UTF-8."""
    def fail(message: str, hint: Optional[str] = None) -> SpecError:
        return SpecError(message, file=path, hint=hint)

    try:
        with open(path, "rb") as f:
            if stat.S_ISDIR(os.fstat(f.fileno()).st_mode):
                raise fail("is a directory, not a spec file")
            data = f.read(MAX_SPEC_BYTES + 1)
    except IsADirectoryError:
        raise fail("is a directory, not a spec file") from None
    except FileNotFoundError:
        raise  # the CLI says "no such file: PATH"; callers may look for a missing file
    except OSError as e:
        raise fail(f"cannot read: {e.strerror or e}") from None
    return _decode(data, fail)


def search_dirs() -> list[str]:
    """Where `use` looks after the including file's directory: PLAIT_PATH, then the library."""
    dirs = [d for d in os.environ.get(SEARCH_PATH_ENV, "").split(os.pathsep) if d]
    if LIBRARY.is_dir():
        dirs.append(str(LIBRARY))
    return dirs


def locate_use(written: str, base_dir: str, fail: Fail) -> str:
    """The file a `use "written"` names: checked to be a relative *.plait path, then looked up next
    to the including file and along the search path."""
    if not written:
        raise fail("`use` needs a path", None)
    if os.path.isabs(written) or written.startswith("~"):
        raise fail(f'cannot use "{written}": `use` paths are relative',
                   f"write it relative to this file, or put its directory on {SEARCH_PATH_ENV}")
    if not written.endswith(SPEC_SUFFIX):
        raise fail(f'cannot use "{written}": `use` reads spec files (*{SPEC_SUFFIX})', None)
    tried = [os.path.normpath(os.path.join(d, written)) for d in [base_dir] + search_dirs()]
    for full in tried:
        if os.path.lexists(full):
            return full
    raise fail(f'cannot use "{written}": no such file',
               "looked in " + ", ".join(os.path.abspath(t) for t in dict.fromkeys(tried)))


def read_used_file(full: str, written: str, fail: Fail) -> str:
    """The text of a file reached through `use`: a regular *.plait file (links followed), within
    the size limit, UTF-8."""
    real = os.path.realpath(full)
    if not real.endswith(SPEC_SUFFIX):
        raise fail(f'cannot use "{written}": it links to {real}, which is not a spec file '
                   f"(*{SPEC_SUFFIX})", None)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise fail(f'cannot use "{written}": {e.strerror or e}', None) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise fail(f'cannot use "{written}": not a regular file', None)
        data = _read_at_most(fd, MAX_SPEC_BYTES + 1)
    finally:
        os.close(fd)
    return _decode(data, lambda message, hint=None: fail(f'cannot use "{written}": {message}', hint))


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _decode(data: bytes, fail: Fail) -> str:
    if len(data) > MAX_SPEC_BYTES:
        raise fail(f"larger than {MAX_SPEC_BYTES >> 20} MiB: not a spec file", None)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 text (byte {e.start}): not a spec file", None) from None
