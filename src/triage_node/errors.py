"""One root exception; subclasses only where callers handle them differently.

Each class's docstring is its default message, so ``raise ConfigError()`` still says something.
"""

from __future__ import annotations


class TriageError(Exception):
    """triage-node failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(TriageError):
    """The configuration is not valid."""


class InvalidUID(TriageError):
    """A DICOM UID is not valid (PS3.5 Section 9.1)."""


class DatasetError(TriageError):
    """The dataset cannot be understood."""


class OutOfResources(TriageError):
    """The node has no room to store more data right now."""


class NotPlaced(OutOfResources):
    """A received file could not be made durable at its place in the spool."""


class DatabaseError(TriageError):
    """The database could not be used."""


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached, or refused the statement."""

    def __init__(self, message: str | None = None, *, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause  # the driver's exception class, for logs (never its parameters)


class SchemaOutOfDate(DatabaseError):
    """The database schema is older than this triage-node; run 'triage-node db upgrade'."""


class AlreadyRunning(TriageError):
    """Another triage-node service already uses this data directory."""


class PreprocessRefused(TriageError):
    """The image cannot be prepared for the model."""


class ModelError(TriageError):
    """The model directory, its manifest or its ONNX file is not usable."""


class DatasetFolderError(TriageError):
    """The labelled data folder is not usable."""
