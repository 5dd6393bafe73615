"""One error type that carries its HTTP status; every user-facing failure is one of these."""

from __future__ import annotations


class ServeAppError(Exception):
    """An error whose message is safe to show a client, with the status it maps to."""

    status_code = 400

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        # Keeps the status when the error crosses a Ray handle (pickled by Ray).
        return (type(self), (self.message, self.status_code))


class BadRequest(ServeAppError):
    """The body could not be parsed at all (invalid JSON, broken binary framing)."""

    status_code = 400


class Unauthorized(ServeAppError):
    status_code = 401


class NotFound(ServeAppError):
    """Unknown model, version, alias or route."""

    status_code = 404


class PayloadTooLarge(ServeAppError):
    status_code = 413


class UnsupportedMediaType(ServeAppError):
    status_code = 415


class InvalidInput(ServeAppError):
    """Parsed, but not a valid request: wrong shape, type, feature count, output name."""

    status_code = 422


class ModelLoadError(ServeAppError):
    """A stored model cannot be used: missing, corrupt, tampered with, or incompatible."""

    status_code = 500


class StoreError(ServeAppError):
    """A model store operation was refused (bad name, path escape, overwrite)."""

    status_code = 400
