"""Operating-system failures (a read-only folder, a directory where a file belongs, a full disk) as
one paragraph that names the path and says what to do: they are the user's to fix, not our bugs,
so the CLI prints them like any other CaiError instead of a traceback."""

from __future__ import annotations

import errno
from pathlib import Path

KEPT = ("Nothing already finished is lost: a stage output keeps every complete row (a torn last line is "
        "dropped on resume), a trainer keeps its complete checkpoints (continue with --resume), and `cai mix` "
        "and `cai export` write temporary files first, so an earlier output is left as it was.")


def _path(e: OSError) -> str:
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return " -> ".join(names) if names else "a file"


def describe_os_error(e: OSError) -> str:
    """The one-paragraph message for an OSError raised while a command ran."""
    path = _path(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full while writing {path}. {KEPT} Free some space (or point the output at another disk) "
                "and rerun the same command to continue.")
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
        return (f"permission denied: {path}. Make it (and its folder) writable by you, or choose another "
                "location, e.g. an --out in a directory you own.")
    if isinstance(e, IsADirectoryError):
        return f"{path} is a directory, but a file is expected there; give the path of a file."
    if isinstance(e, NotADirectoryError):
        return (f"{path}: a part of this path is a file, not a directory; choose a path whose parent folders "
                "are directories.")
    if isinstance(e, FileExistsError):
        is_file = e.filename is not None and Path(e.filename).is_file()
        what = " and is a file, where a directory is needed" if is_file else ""
        return f"{path} already exists{what}; remove it or choose another path."
    if isinstance(e, FileNotFoundError):
        return f"{path}: no such file or directory; check the path and that its folder exists."
    if e.errno == errno.ENAMETOOLONG:
        return f"{path}: the file name is too long for this file system; choose a shorter one."
    reason = e.strerror or str(e) or type(e).__name__
    return f"{path}: {reason} ({type(e).__name__}); check the path and the file system, then rerun."


def describe_decode_error(e: UnicodeError) -> str:
    """A decoding error that no reader turned into an InputError (those name file and line)."""
    return (f"a file is not valid UTF-8 text ({e}); save it as UTF-8. Rerun with --debug to see which "
            "reader met it.")
