"""Exception types raised by services; the HTTP layer maps them to status codes in one place."""


class BoomerangError(Exception):
    """Base class for every error this project raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidPairError(BoomerangError):
    """A teacher/student pair, its config or its manifest is inconsistent."""

    code = "invalid_pair"


class UnsupportedArchitectureError(BoomerangError):
    """The model's architecture is not in the architecture table."""

    code = "unsupported_architecture"


class IntegrityError(BoomerangError):
    """A file's sha256 disagrees with its manifest, or a forbidden format was offered."""

    code = "integrity_error"


class UnknownSizeError(BoomerangError):
    """A requested model id or layer count is not part of the family."""

    code = "model_not_found"


class InvalidRequestError(BoomerangError):
    """A request parameter is invalid."""

    code = "invalid_request"


class ContextLengthError(InvalidRequestError):
    """The prompt (plus requested tokens) exceeds the allowed context."""

    code = "context_length_exceeded"


class OverloadedError(BoomerangError):
    """The engine's queue is full; the caller should retry later."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(BoomerangError):
    """A request ran past its time limit."""

    code = "timeout"


class NotReadyError(BoomerangError):
    """The engine has not finished loading."""

    code = "not_ready"


class TrainingConfigError(BoomerangError):
    """A training run was configured in a way that cannot work."""

    code = "invalid_training_config"


class MemoryLimitError(BoomerangError):
    """The configured limits could need more memory than the machine has left."""

    code = "memory_limit"


class InvalidSettingError(BoomerangError):
    """A server or engine setting has a value that cannot work."""

    code = "invalid_setting"
