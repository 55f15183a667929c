"""The one exception type for problems a user can fix.

`caltech` turns it into a single ``caltech: error: ...`` line and exit status 2 instead of a
traceback, so every message must name the thing that is wrong and say how to fix it (``Fix: ...``).
"""


class CaltechError(Exception):
    """A problem with the user's data, files or options, with the fix in its message."""
