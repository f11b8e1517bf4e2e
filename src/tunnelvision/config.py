"""Settings: built once (from the environment and `serve` flags) and passed in, never global."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Cloudflare answers 524 when a response has not started within 125 s (notes/cloudflare.md).
CLOUDFLARE_READ_TIMEOUT_S = 125.0
# cloudflared keeps idle origin connections for 90 s; closing earlier causes sporadic 502s.
CLOUDFLARED_KEEPALIVE_S = 90

Dtype = Literal["float32", "float16", "bfloat16"]


class Settings(BaseSettings):
    """Every field is also a `tunnelvision serve --flag` and a `TUNNELVISION_FIELD` variable."""

    model_config = SettingsConfigDict(env_prefix="TUNNELVISION_", extra="ignore")

    detector: str = Field(
        "IDEA-Research/grounding-dino-tiny",
        description="GroundingDINO: Hugging Face hub id or local folder",
    )
    segmenter: str = Field(
        "facebook/sam-vit-base",
        description="SAM: hub id (sam-vit-base, -large, -huge) or local folder",
    )
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    dtype: Dtype = Field("float32", description="weights and activations dtype on the device")
    host: str = Field("127.0.0.1", description="bind address (cloudflared connects over loopback)")
    port: int = Field(8000, ge=1, le=65535, description="bind port")
    keep_alive_s: int = Field(
        120, ge=1, description="idle keep-alive; above cloudflared's 90 s pool to avoid 502s"
    )
    max_queue: int = Field(64, ge=1, description="requests waiting for the device; more get 503")
    deadline_s: float = Field(
        100.0, gt=0, description="a request not finished by then gets 504 (under Cloudflare's 125 s)"
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="largest request body (Cloudflare's limit is 100 MB)"
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="largest decoded image (width x height); guards against bombs"
    )
    cpu_threads: int = Field(2, ge=1, description="threads for decoding, resizing and mask encoding")
    sam_chunk_size: int = Field(64, ge=1, description="boxes decoded by SAM in one call")
    warmup: bool = Field(True, description="run one pass through both models before ready")
    demo: bool = Field(False, description="serve tiny random-weight models (outputs are meaningless)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("deadline_s")
    @classmethod
    def _under_cloudflare_timeout(cls, value: float) -> float:
        if value >= CLOUDFLARE_READ_TIMEOUT_S:
            raise ValueError(
                f"must be below Cloudflare's {CLOUDFLARE_READ_TIMEOUT_S:.0f} s read timeout, "
                "or clients get 524 instead of a JSON error"
            )
        return value
