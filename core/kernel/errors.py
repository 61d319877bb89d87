"""User-facing errors.

Everything a user can cause (a bad recipe, a missing file, an adapter made for another base)
raises a subclass of :class:`PlugtuneError`. The CLI prints ``error: <message>`` on one line
(several lines only when a recipe has several problems, one per problem), with no traceback,
and exits with the class's ``exit_code``. Anything else is a bug: the CLI's last guard prints it
as one line and exits 70, with the traceback under ``--debug`` or ``PLUGTUNE_DEBUG=1``.
"""

from __future__ import annotations


class PlugtuneError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the whole message."""

    exit_code = 1


class RecipeError(PlugtuneError):
    """A recipe (or an override) is invalid. ``problems`` holds one line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{where}{len(self.problems)} problems\n{lines}"
        super().__init__(message)


class DataError(PlugtuneError):
    """A data file is missing, unreadable, empty or lacks a column."""

    exit_code = 3


class ModelError(PlugtuneError):
    """A base model cannot be found or loaded."""

    exit_code = 4


class AdapterError(PlugtuneError):
    """An adapter is missing, corrupt, or does not fit the base it is loaded onto."""

    exit_code = 5


class PluginError(PlugtuneError):
    """A plugin failed to import, register, or run a hook."""

    exit_code = 6


class TrainingError(PlugtuneError):
    """Training cannot go on (e.g. the loss became NaN)."""

    exit_code = 7
