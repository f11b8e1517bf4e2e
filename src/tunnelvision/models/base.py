"""What the families share: where a model came from and runs, and the per-image cache of what its
image encoder computed (SAM's embedding, SAM 2's feature maps, SAM 3's vision features)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, Protocol, TypeVar

import torch

from tunnelvision.engine.cache import ByteLRU
from tunnelvision.models.loading import ModelSource, memory_allocated

V = TypeVar("V")


class Family:
    """A loaded model: its source (for /v1/models), device and dtype."""

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
        self.source, self.device, self.dtype = source.source, device, dtype

    def memory_allocated(self) -> int | None:
        return memory_allocated(self.device)


class EncodedImage(Protocol):
    """A prepared image: its pixels as the encoder takes them, and its sender's id ("": not cached)."""

    pixels: torch.Tensor
    image_id: str
    encode_ms: float | None  # set by ImageCache.fetch when this image went through the encoder


class ImageCache(Generic[V]):
    """Encoder outputs by image, bounded in bytes. `fetch` encodes only the images not found, all
    together in one batch; the key also names the model, dtype and input shape."""

    def __init__(self, owner: Family, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.owner = owner
        self.lru: ByteLRU[V] = ByteLRU(max_bytes)
        self.size_of = size_of

    def fetch(self, images: Sequence[EncodedImage], encode: Callable[[torch.Tensor], Sequence[V]]) -> list[V]:
        """One output per image; `encode` takes the missing images' pixels concatenated (on the
        model's device and dtype) and returns one output each."""
        found: list[V | None] = [self.lru.get(self.key(i)) if i.image_id else None for i in images]
        missing = [i for i, value in enumerate(found) if value is None]
        if missing:
            started = time.perf_counter()
            pixels = torch.cat([images[i].pixels for i in missing]).to(self.owner.device, self.owner.dtype)
            encoded = encode(pixels)
            if self.owner.device.type == "cuda":
                torch.cuda.synchronize(self.owner.device)  # the kernels run asynchronously
            encode_ms = round((time.perf_counter() - started) * 1000, 2)
            for i, value in zip(missing, encoded, strict=True):
                found[i] = value
                images[i].encode_ms = encode_ms  # shared by the images encoded together
                if images[i].image_id:
                    self.lru.put(self.key(images[i]), value, self.size_of(value))
        return [value for value in found if value is not None]

    def key(self, image: EncodedImage) -> Hashable:
        owner = self.owner
        return (image.image_id, owner.source, str(owner.dtype), tuple(image.pixels.shape))

    def stats(self) -> dict[str, int]:
        return self.lru.stats()

    def clear(self) -> None:
        self.lru.clear()


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def tensor_bytes_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
