"""The project's error types: a user's mistake or a missing input. The CLI prints these as one line; anything
else (a bug in sitlib, torch or TRL) keeps its traceback."""
from __future__ import annotations


class SitError(Exception):
    """Base of every error the user can fix (bad input, missing prerequisite, no access, no memory)."""


class ConfigError(SitError, ValueError):
    """config.json / -p / a notebook parameter: names the key and the expected form."""


class MissingInputError(SitError, FileNotFoundError):
    """An input another notebook writes is absent: names the file and the notebook to run first."""


class BadInputError(SitError, ValueError):
    """A data file the user handed in is malformed: names file:line and the expected form."""


class HubAccessError(SitError):
    """A hub model cannot be reached (gated, no token, offline): names the model and how to fix it."""


class ProfileError(SitError):
    """The chosen profile does not fit the hardware present: names the card's memory and a profile that fits."""


class OutOfMemoryError(SitError):
    """GPU out of memory at a stage boundary: names the profile values to lower."""


class RunLockedError(SitError):
    """Another run holds the output tree: names the tree and that run's pid."""


class PipelineError(SitError):
    """A notebook run by papermill failed: names the notebook and the cell."""
