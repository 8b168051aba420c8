"""UnicError tree with exit codes.

Anything a user can cause raises a `UnicError` that states the problem, the offending value and the fix.
The CLI prints it without a traceback and exits with `exit_code` (2 for bad input, 1 for runtime failures).
"""

from __future__ import annotations

from collections.abc import Iterable


class UnicError(Exception):
    """Base class of every error a user can cause; printed without a traceback."""

    exit_code: int = 2


class ConfigError(UnicError):
    """One or more problems in a command's configuration, reported together."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} problems in the configuration:\n{lines}"
        super().__init__(message)


class RegistryError(UnicError):
    """A malformed teacher card, or a card that disagrees with the model it describes."""


class UnknownTeacherError(RegistryError):
    """An alias or spec that resolves to no teacher."""


class WeightsError(UnicError):
    """Weights that cannot be downloaded, read, or matched to the architecture."""


class DataError(UnicError):
    """A dataset folder that is missing, empty or laid out wrongly."""


class CheckpointError(UnicError):
    """A file that is not a readable unic checkpoint."""


class ExportError(UnicError):
    """An export that cannot be written or verified."""


class ProbeError(UnicError):
    """A probe that cannot run on the given models or data."""


class TrainingError(UnicError):
    """A failure during training that the user must act on (non-finite loss, ...)."""

    exit_code = 1


class ExportVerificationError(ExportError):
    """An exported folder that does not reproduce its checkpoint's features (a bug, not a user mistake)."""

    exit_code = 1
