"""User-facing errors: one line that says what is wrong and how to fix it."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence


class MMGenError(Exception):
    """An error the CLI reports as one line (no traceback unless --debug).

    `hint` says how to fix it; `exit_code` is what the process exits with. An error about arguments
    names each one in `params` as `{name}` in its message and hint (`UsageError("{steps} must be >= 1",
    params=["steps"])`): `str()` and `message` show the library's parameter names, `describe(words)`
    the caller's words for them (the CLI passes its option names), so the library never spells a flag.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, *, params: Sequence[str] = ()) -> None:
        self.params = tuple(params)
        self._templates = (message, hint)
        self.message = self._fill(message, {})
        self.hint = None if hint is None else self._fill(hint, {})
        super().__init__(self.message)

    def _fill(self, template: str, words: Mapping[str, str]) -> str:
        for name in self.params:
            template = template.replace("{" + name + "}", words.get(name, name))
        return template

    def reworded(self, words: Mapping[str, str]) -> MMGenError:
        """This error with its parameters named by `words` (parameter name -> what the caller calls it)."""
        message, hint = self._templates
        other = copy.copy(self)
        other.message = self._fill(message, words)
        other.hint = None if hint is None else self._fill(hint, words)
        other.args = (other.message,)
        return other

    def describe(self, words: Mapping[str, str]) -> str:
        """The one line, with the parameters named by `words`."""
        return str(self.reworded(words))

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(MMGenError):
    """An invalid configuration value."""


class RunDirError(MMGenError):
    """A run directory that is missing, incomplete, corrupt or of another model."""


class RunDirBusyError(RunDirError):
    """Another process is writing into the run directory. Exit code 75 (EX_TEMPFAIL): retrying later can work."""

    exit_code = 75


class OutputBusyError(MMGenError):
    """Another process is writing into the same output folder. Exit code 75 (EX_TEMPFAIL): retrying later can work."""

    exit_code = 75


class UsageError(MMGenError):
    """Invalid command-line input (bad numbers, unknown names)."""

    exit_code = 2


class NotAvailableError(MMGenError):
    """A feature that this version or this machine does not provide."""


class UnsafePathError(MMGenError):
    """A path mmgen would write to (or through) that is not a regular file or folder: a symbolic link,
    a device node, a FIFO or a socket. mmgen never replaces, truncates or follows into those."""


class DiskFullError(MMGenError):
    """The disk (or the user's quota) ran out while writing; what was being written was removed."""
