"""Engine errors with stable codes: the daemon puts the code on the wire, users read the message.

A code a job can fail with is one of clients.protocol.Code (the one registry, docs/protocol.md);
the others (model_not_downloaded, conversion_failed) never leave the daemon or its command line.
"""

from __future__ import annotations

from diffusiond.clients.protocol import Code


class EngineError(Exception):
    code = "engine_error"


class InvalidParameter(EngineError):
    """A job parameter out of its documented range; the message says which and what is allowed."""

    code = Code.INVALID_PARAMETER

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(EngineError):
    code = Code.MODEL_NOT_FOUND


class ModelNotDownloaded(ModelNotFound):
    """A Hub model that is not (completely) in the Hugging Face cache yet."""

    code = "model_not_downloaded"


class ModelInvalid(EngineError):
    code = Code.MODEL_INVALID


class Cancelled(EngineError):
    code = Code.CANCELLED


class ConversionFailed(EngineError):
    """`diffusiond convert` could not make Core ML models; the message says what to do next."""

    code = "conversion_failed"
