"""Names from disk and the network as text that is safe to print and to write: file names that
are not valid UTF-8, control characters that would break a message's one line or drive a
terminal, and CSV cells that a spreadsheet would run as formulas."""

from __future__ import annotations

import logging
import os
from pathlib import PurePath

# A cell whose text (past any leading white space) starts with one of these is a formula to a
# spreadsheet (OWASP, "CSV Injection"), fullwidth forms included, which some spreadsheets read as
# the operators.
FORMULA_STARTS = tuple("=+-@|") + tuple("＝＋－＠｜")
WHITE_SPACE = " \t\r\n"


def printable(name: str) -> str:
    """``name`` with the bytes of a file name that is not valid UTF-8 written as ``\\xNN``, so it
    can be printed and written to a UTF-8 file (Python keeps such bytes as lone surrogates)."""
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name
        return name.encode("utf-8", "backslashreplace").decode()


def escaped(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``), so a message stays one
    line and a name cannot move the terminal's cursor or forge a ``caltech: error:`` line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def reason(error: BaseException) -> str:
    """Why something failed, for a message of one line: the error's type and text, its white space
    folded, at most 200 characters."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:200]


def shown(name: object) -> str:
    """A file or class name as it may be printed: valid UTF-8, control characters escaped."""
    return escaped(printable(str(name)))


def text_cell(value: str) -> str:
    """A name or message as a CSV cell that a spreadsheet shows as text and never runs: a cell
    that starts with white space or, past it, with ``= + - @ |`` (or their fullwidth forms) gets a
    leading single quote (OWASP's advice for CSV injection). Numbers we format ourselves are
    written as they are."""
    cell = printable(value)
    risky = cell[:1] in WHITE_SPACE or cell.lstrip(WHITE_SPACE).startswith(FORMULA_STARTS)
    return "'" + cell if cell and risky else cell


def from_cell(cell: str) -> str:
    """The text a CSV cell written by :func:`text_cell` holds, without the quote it may have added."""
    return cell[1:] if cell.startswith("'") and text_cell(cell[1:]) == cell else cell


class EscapeArguments(logging.Filter):
    """Escape the names in a log record's arguments (``log.info("... %s", path)``), which come
    from disk, archives and servers, so that no name prints control characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(shown(a) if isinstance(a, (str, PurePath)) else a for a in record.args)
        return True
