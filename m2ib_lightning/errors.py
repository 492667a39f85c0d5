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


#: What the CLI reports as a one-paragraph message (exit status 2) instead of a stack trace.
USER_ERRORS = (ConfigError, BackboneLoadError, DatasetOpenError)
