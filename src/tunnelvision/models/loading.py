"""Where weights come from (a local folder or a hub id) and failing fast when they can't."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch

from tunnelvision.errors import ModelUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    source: str  # what the user gave
    location: str  # what from_pretrained gets
    local_files_only: bool


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelUnavailable(f"device '{name}' requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float16" and device.type == "cpu":
        raise ModelUnavailable("dtype float16 is not supported on the CPU: use float32 or bfloat16")
    return DTYPES[name]


def processor_kwargs() -> dict[str, Any]:
    """Without torchvision, ask for the PIL image processors outright (no fallback warning)."""
    return {} if importlib.util.find_spec("torchvision") else {"backend": "pil"}


def resolve_source(source: str, role: str) -> ModelSource:
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"{role} folder '{source}' has no config.json: not a saved model")
        return ModelSource(source, str(path), local_files_only=True)
    if _looks_like_path(source):
        raise ModelUnavailable(f"{role} folder '{source}' does not exist")
    return _resolve_hub_id(source, role)


def load_pretrained(loader: Callable[..., T], model: ModelSource, role: str, **kwargs: Any) -> T:
    try:
        return loader(model.location, local_files_only=model.local_files_only, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(_unavailable_message(model.source, role, str(exc).splitlines()[0])) from exc


def load_model(loader: Callable[..., T], model: ModelSource, role: str, attention: str) -> T:
    """With the requested attention kernel (SDPA) where the architecture has it, else its default."""
    try:
        return load_pretrained(loader, model, role, attn_implementation=attention)
    except ModelUnavailable as exc:
        if "attention implementation" not in str(exc.__cause__):
            raise
        log.info("%s: no '%s' attention in this architecture; using its default", role, attention)
        return load_pretrained(loader, model, role)


def _resolve_hub_id(repo_id: str, role: str) -> ModelSource:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return ModelSource(repo_id, repo_id, local_files_only=True)
    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(
            _unavailable_message(repo_id, role, "not in the cache and HF_HUB_OFFLINE is set")
        )
    if not _hub_reachable(constants.ENDPOINT):
        raise ModelUnavailable(
            _unavailable_message(repo_id, role, f"not in the cache and {constants.ENDPOINT} is unreachable")
        )
    return ModelSource(repo_id, repo_id, local_files_only=False)


def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """One quick connection attempt, so an offline box fails in seconds, not after minutes of retries."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep + os.sep in source


def _unavailable_message(source: str, role: str, reason: str) -> str:
    from huggingface_hub import constants

    return (
        f"cannot load the {role} '{source}': {reason}. Cache folder: {constants.HF_HUB_CACHE}. "
        f"Remedies: pass a local folder saved with save_pretrained (--{role} /path/to/folder), "
        f"download it where the hub is reachable (`hf download {source}`) and copy the cache "
        "folder here (or set HF_HOME), or try `tunnelvision serve --demo` (random weights)."
    )


@dataclass(frozen=True)
class LoadOptions:
    """How every family is loaded and run; each family uses the fields that concern it."""

    attention: str = "sdpa"
    compile_encoder: bool = False  # torch.compile the image encoder (fixed input size: one compile)
    sam_chunk_size: int = 64  # boxes decoded in one call
    cache_bytes: int = 0  # image embeddings kept per segmenter copy


def to_device(model: T, device: torch.device, dtype: torch.dtype) -> T:
    return model.to(device=device, dtype=dtype).eval()  # type: ignore[attr-defined, no-any-return]


def memory_allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torchvision_importable() -> bool:
    # Installed is not enough: a torchvision built for another torch fails at import.
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True
