"""tunnelvision: zero-shot detection and segmentation (Grounded-SAM) as an HTTP API."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunnelvision.client import (
        APIError,
        AsyncClient,
        AuthenticationError,
        Client,
        ConnectionFailed,
        InvalidRequest,
        Overloaded,
        ServerError,
        TransportError,
    )

# Served from tunnelvision.client on first use: `import tunnelvision` stays light (no httpx,
# numpy or Pillow until a client or one of its errors is asked for).
__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ConnectionFailed",
    "InvalidRequest",
    "Overloaded",
    "ServerError",
    "TransportError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tunnelvision import client

        return getattr(client, name)
    raise AttributeError(f"module 'tunnelvision' has no attribute {name!r}")
