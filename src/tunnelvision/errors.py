"""Domain errors. No HTTP here: api/errors.py maps each class to a status in one table."""

from __future__ import annotations

from typing import ClassVar


class TunnelvisionError(Exception):
    """An error whose message is safe to show to the client."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(TunnelvisionError):
    code = "invalid_input"


class InvalidImage(InvalidInput):
    code = "invalid_image"


class UnsupportedMediaType(TunnelvisionError):
    code = "unsupported_media_type"


class PayloadTooLarge(TunnelvisionError):
    code = "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    code = "image_too_large"


class NotFound(TunnelvisionError):
    code = "not_found"


class DeadlineExceeded(TunnelvisionError):
    code = "deadline_exceeded"


class ModelUnavailable(TunnelvisionError):
    """A model could not be loaded; raised at start-up, never per request."""

    code = "model_unavailable"


class Retryable(TunnelvisionError):
    """The server cannot take the request now; the client should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(Retryable):
    code = "queue_full"


class ShuttingDown(Retryable):
    code = "shutting_down"


class NotReady(Retryable):
    code = "not_ready"


class WorkerUnavailable(Retryable):
    code = "worker_unavailable"


class DeviceOutOfMemory(Retryable):
    code = "device_out_of_memory"


class QuotaExceeded(TunnelvisionError):
    code = "quota_exceeded"


class RequestTooCostly(InvalidInput):
    """The request would make more mask pixels than the server allows (checked before any work)."""

    code = "request_too_costly"


class StorageFull(TunnelvisionError):
    """The server's disk has no room for the upload; nothing of it was kept."""

    code = "insufficient_storage"


class UnsupportedImageFormat(UnsupportedMediaType):
    """An image in a format the server does not open (ICO, PSD, ...); the message lists those it does."""

    code = "unsupported_image_format"


class MalformedInput(InvalidInput):
    """Bytes that cannot be read as what they claim to be: JSON nested too deeply, a damaged,
    encrypted or unsafe archive member."""

    code = "malformed_input"


class UnknownModel(InvalidInput):
    """A request named a pipeline (`model`) this server does not serve."""

    code = "unknown_model"


class UnsupportedPrompt(InvalidInput):
    """A request asked a pipeline for something it cannot do (text to a segmenter alone...)."""

    code = "unsupported_prompt"


class ReloadFailed(TunnelvisionError):
    """New weights could not be loaded or warmed up; the pipeline's old copy goes on serving."""

    code = "reload_failed"


class ReloadInProgress(TunnelvisionError):
    """Another reload is loading right now; one at a time."""

    code = "reload_in_progress"


class Unauthorized(TunnelvisionError):
    """No valid credentials (a key or a Cloudflare Access login) for a protected route."""

    code = "unauthorized"


class Forbidden(TunnelvisionError):
    """Valid credentials without the scope the route needs."""

    code = "forbidden"


class RateLimited(Retryable):
    """One client sent more than its rate allows."""

    code = "rate_limited"


class TooManyInFlight(RateLimited):
    """One client has as many requests queued or running as it may."""

    code = "too_many_inflight"


class InvalidVideo(MalformedInput):
    """Not a readable clip: empty, truncated, damaged, no frames."""

    code = "invalid_video"


class VideoTooLarge(PayloadTooLarge):
    """Over a clip limit: bytes, duration or frame count."""

    code = "video_too_large"


class FrameTooLarge(ImageTooLarge):
    """A clip whose frames are over the resolution limit."""

    code = "frame_too_large"


class UnsupportedVideoFormat(UnsupportedMediaType):
    """A file that is not a clip this server reads (the message lists those it does)."""

    code = "unsupported_video_format"
