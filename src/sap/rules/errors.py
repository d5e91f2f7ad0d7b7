"""The one error family of sap.

Every error a user can cause or fix (a bad config key, a missing file, a dead retriever, a
framework run that failed) is a :class:`SapError`. The CLI handles the family once, at the top
(``sap.cli.SapGroup``): it prints ``error: <message>`` and exits with the error's ``exit_code``.
Anything else that escapes is a bug and keeps its traceback.

Lives in ``sap.rules`` (no heavy imports) so the retriever service can use it too.
"""

from __future__ import annotations


class SapError(Exception):
    """A failure with a message meant for the user (names the file, line, key or command to run)."""

    exit_code: int = 2
    """2: bad input or setup (the user must change something); 1: a run that failed."""


class RunFailed(SapError):
    """A stage ran and failed (a child process exited non-zero, too many failed searches, ...)."""

    exit_code = 1


class Interrupted(SapError):
    """Ctrl-C or SIGTERM stopped a stage (its children were stopped; what finished is kept)."""

    exit_code = 130
