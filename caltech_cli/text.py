"""Names from disk and the network as text that is safe to print and to write: file names that
are not valid UTF-8, control characters that would break a message's one line, and CSV cells
that a spreadsheet would run as formulas."""

from __future__ import annotations

import os

# A cell that starts with one of these is a formula to a spreadsheet (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def printable(name: str) -> str:
    """``name`` with the bytes of a file name that is not valid UTF-8 written as ``\\xNN``, so it
    can be printed and written to a UTF-8 file (Python keeps such bytes as lone surrogates)."""
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name
        return name.encode("utf-8", "backslashreplace").decode()


def escaped(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``), so a message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def text_cell(value: str) -> str:
    """A name or message as a CSV cell that a spreadsheet shows as text and never runs: a cell
    starting with ``= + - @``, a tab or a carriage return gets a leading single quote (OWASP's
    advice for CSV injection). Numbers we format ourselves are written as they are."""
    shown = printable(value)
    return "'" + shown if shown.startswith(FORMULA_STARTS) else shown
