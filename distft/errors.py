"""The one error hierarchy of distft: what the `distft` command turns into one clear message.

- `UserError` (exit 2): input the user can fix (a config field, a path, an argument). One line,
  naming the field or path and the fix; raised before any cluster resources are taken.
- `StageFailed` (exit 1): a stage ran and failed (in a worker, or in the driver while it ran):
  `stage <label> failed on rank N: <Type>: <message>`, plus a `Fix:` or the resume command.
  Its full traceback goes to a log file in the run directory, not to the terminal.

Every layer may raise these (this module imports nothing of distft), and the CLI catches
`DistftError` alone: anything else reaching it is a bug of ours, shown with its traceback.
"""

from __future__ import annotations


class DistftError(Exception):
    """Base of every error distft reports to the user without a traceback."""

    exit_code = 2


class UserError(DistftError):
    """Bad input, fixable by the user; exit 2."""

    exit_code = 2


class StageFailed(DistftError):
    """A stage's run failed (not its input); exit 1. `log_path` holds the full tracebacks, when written."""

    exit_code = 1

    def __init__(self, message: str, log_path: str | None = None):
        super().__init__(message)
        self.log_path = log_path
