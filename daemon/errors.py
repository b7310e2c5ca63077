"""Engine errors with stable codes: the daemon puts the code on the wire, users read the message."""

from __future__ import annotations


class EngineError(Exception):
    code = "engine_error"


class InvalidParameter(EngineError):
    """A job parameter out of its documented range; the message says which and what is allowed."""

    code = "invalid_parameter"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(EngineError):
    code = "model_not_found"


class ModelNotDownloaded(ModelNotFound):
    """A Hub model that is not (completely) in the Hugging Face cache yet."""

    code = "model_not_downloaded"


class ModelInvalid(EngineError):
    code = "model_invalid"


class Cancelled(EngineError):
    code = "cancelled"


class ConversionFailed(EngineError):
    """`diffusiond convert` could not make Core ML models; the message says what to do next."""

    code = "conversion_failed"
