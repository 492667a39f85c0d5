"""Errors whose message tells the user everything; the CLI prints them without a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting has a value it cannot take; the message names the setting, the expected and the given value."""


class BackboneLoadError(RuntimeError):
    """A checkpoint could not be found or fetched; the message names what and where."""


class DatasetOpenError(RuntimeError):
    """A dataset could not be opened or fetched; the message names it."""


class DataFileNotFoundError(DatasetOpenError, FileNotFoundError):
    """A local data file named in the config does not exist."""


class RunOutcomeError(RuntimeError):
    """A run that went to its end but did not do its job: it had rows to attribute and wrote no record,
    or it skipped more of its rows than ``data.max_skip_fraction`` allows. The message names the
    numbers and the top skip reasons; the records written are kept.

    Attributes:
        exit_status: the CLI's exit status for it (3: the settings were usable, the data was not).
        show: whether this process prints the message (the global rank 0 does; the others exit
            with the same status quietly, so a multi-rank job prints it once).
    """

    exit_status = 3

    def __init__(self, message: str, show: bool = True) -> None:
        super().__init__(message)
        self.show = show


#: What the CLI reports as a one-paragraph message instead of a stack trace (exit status 2, or the
#: error's ``exit_status``).
USER_ERRORS = (ConfigError, BackboneLoadError, DatasetOpenError, RunOutcomeError)


def user_error(err: BaseException | None) -> BaseException | None:
    """The first of :data:`USER_ERRORS` in ``err``'s chain of causes and contexts (``None``: none there).

    Lightning and jsonargparse wrap what a component raises; the commands report the user's error itself."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
