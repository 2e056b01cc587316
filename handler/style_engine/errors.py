"""Errors a request can cause. Each names the field or part at fault and maps to the error JSON of
docs/api.md, "Errors"."""

# Messages quote what was sent ("got '...'"), and field names can be any key a client sends: an answer
# echoes at most this much of it back, however large the request.
MAX_MESSAGE_CHARS = 1000
MAX_FIELD_CHARS = 100


class RequestError(ValueError):
    """Bad input: the client's fault, answered with `status` and never with a 5xx."""

    status = 400
    kind = "BadRequest"

    def __init__(self, field: str, message: str):
        super().__init__(_bounded(message, MAX_MESSAGE_CHARS))
        self.field = _bounded(field, MAX_FIELD_CHARS)

    def to_json(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": str(self), "field": self.field}


class ParamError(RequestError):
    """An invalid request parameter; the message says what was sent and what is allowed."""

    kind = "InvalidParameter"


class ImageError(RequestError):
    """An image part that cannot be used: empty, not an image, corrupt, or of an unusable shape."""

    kind = "InvalidImage"


class TooLargeError(RequestError):
    """An image or request over the configured limits."""

    status = 413
    kind = "TooLarge"


class NotEnoughMemory(TooLargeError):
    """A request whose estimated peak memory exceeds what the worker has for one (memory.py)."""


class NotEnoughTime(TooLargeError):
    """A request whose work that no time budget interrupts could not end within the server's maximum time
    even alone (cost.py)."""


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... (cut at {limit} characters)"
