"""tunnelvision: zero-shot detection and segmentation (Grounded-SAM) as an HTTP API."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunnelvision.client import AsyncClient, Client


def __getattr__(name: str) -> Any:
    """`tunnelvision.Client` without importing httpx for every `import tunnelvision`."""
    if name in ("Client", "AsyncClient"):
        from tunnelvision import client

        return getattr(client, name)
    raise AttributeError(name)


__all__ = ["AsyncClient", "Client", "__version__"]
