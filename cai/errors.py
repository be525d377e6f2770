"""User-facing errors: the CLI prints these as one paragraph and exits non-zero, never a traceback."""

from __future__ import annotations


class CaiError(Exception):
    """An error caused by the user's input (a file, a flag, a model path), with a message that says what to do."""

    exit_code: int = 1


class InputError(CaiError):
    """A problem in an input file: names the file, the line (when known) and what is wrong."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.detail = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"{field}: {message}" if field else message
        super().__init__(f"{where}: {what}")
