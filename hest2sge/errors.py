"""The one error type hest2sge raises for bad input, and helpers that produce it.

:class:`Hest2sgeInputError` (a ``ValueError``) says what is wrong, where (the file, with row and
column where known, or the argument) and what to do. Readers wrap the errors of the parsers
they use (gzip, zlib, h5py, json, pandas) in it with :func:`reading`, so a truncated or
corrupt file is reported by its name instead of by a parser's internals.
:class:`hest2sge.data.slide.SlideError` (a slide breaking the data contract) is a subclass.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Hest2sgeInputError(ValueError):
    """Bad input: names the file (row/column where known) or argument, and what to do.

    Args:
        message: What is wrong.
        path: The offending file (prefixed to the message).
        row: Row (1-based line of a table, or a spot barcode) where known.
        column: Column (or gene) where known.
        hint: What to do about it (appended to the message).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        row: Any = None,
        column: Any = None,
        hint: str | None = None,
    ) -> None:
        where = os.fspath(path) if path is not None else ""
        if row is not None:
            where += f"{', ' if where else ''}row {row}"
        if column is not None:
            where += f"{', ' if where else ''}column {column!r}"
        text = f"{where}: {message}" if where else message
        if hint:
            text += f"; {hint}"
        super().__init__(text)
        self.path = None if path is None else os.fspath(path)
        self.row = row
        self.column = column
        self.hint = hint


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


@contextmanager
def reading(path: str | os.PathLike, what: str, hint: str | None = None) -> Iterator[None]:
    """Turn a parser's error while reading ``path`` into a :class:`Hest2sgeInputError`.

    Errors that already are hest2sge input errors, and ``FileNotFoundError``, pass unchanged.

    Args:
        path: The file being read.
        what: What the file should be (``"counts table"``, ``"scale factors JSON"``...).
        hint: What to do (default: check or re-download the file).
    """
    try:
        yield
    except (Hest2sgeInputError, FileNotFoundError):
        raise
    except Exception as err:
        parser = type(err).__module__.split(".")[0] in _PARSER_MODULES
        if not (parser or isinstance(err, _PARSER_ERRORS)):
            raise
        raise Hest2sgeInputError(
            f"cannot read this {what} ({_first_line(err)})",
            path=path,
            hint=hint or "the file is truncated, corrupt or not in the expected format; "
            "check it or download it again",
        ) from err


#: Errors that parsers raise for malformed files (gzip.BadGzipFile and h5py errors are OSError,
#: json.JSONDecodeError and pandas' ParserError/EmptyDataError are ValueError).
_PARSER_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, UnicodeError)
#: Modules whose own exception types (zlib.error, ...) mean a malformed file.
_PARSER_MODULES = ("zlib", "gzip", "json", "h5py", "pandas", "anndata", "tifffile", "PIL")


def check_arg(ok: bool, name: str, value: Any, expected: str, owner: str = "") -> None:
    """Raise a :class:`Hest2sgeInputError` naming argument ``name`` unless ``ok``."""
    if not ok:
        where = f"{owner}: " if owner else ""
        raise Hest2sgeInputError(
            f"{where}argument {name}={value!r} ({type(value).__name__}) is invalid: "
            f"expected {expected}"
        )
