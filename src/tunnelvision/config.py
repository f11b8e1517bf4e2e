"""Settings: built once (from the environment and `serve` flags) and passed in, never global."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Cloudflare answers 524 when a response has not started within 125 s (notes/cloudflare.md).
CLOUDFLARE_READ_TIMEOUT_S = 125.0
# cloudflared keeps idle origin connections for 90 s; closing earlier causes sporadic 502s.
CLOUDFLARED_KEEPALIVE_S = 90

Dtype = Literal["float32", "float16", "bfloat16"]
GROUNDED_SAM = "grounded-sam"  # the pipeline --detector/--segmenter define
PIPELINE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class PipelineSpec:
    """`NAME=DETECTOR+SEGMENTER` or `NAME=MODEL`; each part a hub id or a local folder."""

    name: str
    parts: tuple[str, ...]


def parse_pipeline(text: str) -> PipelineSpec:
    name, equals, spec = text.partition("=")
    name = name.strip()
    if not equals:
        raise ValueError(f"'{text}' is not NAME=SPEC, e.g. grounded-sam=DETECTOR+SEGMENTER or sam=MODEL")
    if not PIPELINE_NAME.fullmatch(name):
        raise ValueError(f"pipeline name '{name}': use 1-64 letters, digits, '-', '_' or '.'")
    parts = tuple(part.strip() for part in spec.split("+"))
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise ValueError(f"pipeline '{name}': SPEC '{spec}' must be DETECTOR+SEGMENTER or one model")
    return PipelineSpec(name, parts)


AuthPolicy = Literal["auto", "keys", "access", "either", "both"]


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
    pipeline: list[str] = Field(
        default_factory=list,
        description=(
            "NAME=SPEC, repeatable (env: a JSON list): SPEC is DETECTOR+SEGMENTER or one model (hub id "
            "or folder); requests choose one with `model`; the first is the default (grounded-sam, "
            "from --detector/--segmenter, comes first when those are given or no --pipeline is)"
        ),
    )
    device: str = Field(
        "auto",
        description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps; 'cuda:0,cuda:1': one copy each",
    )
    dtype: Dtype = Field("float32", description="weights and activations dtype on the device")
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="attention kernel where the model has it (SAM: sdpa; GroundingDINO: eager)"
    )
    compile: bool = Field(
        False,
        description="torch.compile SAM's image encoder (GPU; recompiles per batch size: "
        "use with --max-batch 1)",
    )
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
    max_mask_pixels: int = Field(
        2_000_000_000,
        ge=1,
        description="masks x image pixels one request may make (boxes or max_detections); more gets 422",
    )
    cpu_threads: int = Field(2, ge=1, description="threads for decoding, resizing and mask encoding")
    sam_chunk_size: int = Field(64, ge=1, description="boxes decoded by SAM in one call")
    max_batch: int = Field(8, ge=1, le=64, description="requests the device worker runs in one pass")
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="how long the worker waits for company before a pass"
    )
    cache_bytes: int = Field(
        1024**3, ge=0, description="SAM image embeddings kept (LRU, bytes); a repeat image skips the encoder"
    )
    image_cache_bytes: int = Field(
        512 * 1024**2, ge=0, description="decoded images kept for `image_id` requests (LRU, bytes)"
    )
    warmup: bool = Field(True, description="run one pass through both models before ready")
    demo: bool = Field(False, description="serve tiny random-weight models (outputs are meaningless)")
    backend: Literal["grounded-sam", "simulated"] = Field(
        "grounded-sam", description="simulated: a sleeping fake device, for benchmarks only"
    )
    simulated_batch_ms: float = Field(40.0, ge=0, description="simulated device: cost of one pass (ms)")
    simulated_item_ms: float = Field(5.0, ge=0, description="simulated device: extra cost per item (ms)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log: bool = Field(True, description="one JSON line per request (never the key itself)")

    # -- Ray Serve mode --------------------------------------------------------------------------
    ray: bool = Field(
        False,
        description="run the models as a Ray Serve deployment (pip install 'tunnelvision[ray]'); "
        "this process stays the HTTP ingress",
    )
    ray_address: str = Field(
        "", description="Ray cluster to join (e.g. 10.0.0.5:6379); none: start a local one"
    )
    ray_min_replicas: int = Field(1, ge=1, description="Ray mode: fewest model replicas")
    ray_max_replicas: int = Field(
        1, ge=1, description="Ray mode: most model replicas (above min: autoscaled on requests in flight)"
    )
    ray_num_gpus: float | None = Field(
        None,
        ge=0,
        description="Ray mode: GPUs per replica, may be fractional; none: 1 if the cluster has GPUs, else 0",
    )
    ray_upscale_delay_s: float = Field(
        10.0, ge=0, description="Ray mode: load held this long before a replica is added"
    )
    ray_downscale_delay_s: float = Field(
        120.0, ge=0, description="Ray mode: quiet held this long before a replica is removed"
    )
    ray_app_name: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="Ray mode: the Serve application's name; none: tunnelvision-MACHINE-PORT",
    )

    # -- jobs ------------------------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=lambda: Path.home() / ".local" / "share" / "tunnelvision",
        description="where jobs (SQLite database and uploaded images) are kept",
    )
    jobs_quota_bytes: int = Field(
        2 * 1024**3, ge=0, description="disk for the images of unfinished jobs; more gets 507"
    )
    max_job_images: int = Field(1000, ge=1, description="images in one job")
    jobs_owner_quota_bytes: int = Field(
        1024**3, ge=0, description="disk for the images of one key's unfinished jobs; more gets 507"
    )
    job_max_attempts: int = Field(
        3, ge=1, description="tries per job image (a crash mid-image counts); then it is recorded failed"
    )
    jobs_retention_s: float = Field(
        7 * 86400.0, gt=0, description="finished jobs and their results are deleted this long after"
    )

    # -- video jobs (share the jobs quota and retention) -----------------------------------------
    video_max_duration_s: float = Field(600.0, gt=0, description="longest clip /v1/videos takes (s)")
    video_max_frames: int = Field(18_000, ge=1, description="most frames in one clip")
    video_max_width: int = Field(3840, ge=16, description="widest frame (either way round)")
    video_max_height: int = Field(2160, ge=16, description="tallest frame (either way round)")
    video_chunk_frames: int = Field(
        8, ge=1, le=256, description="frames tracked per device turn; an image request waits at most one"
    )
    video_keepalive_s: float = Field(
        15.0, gt=0, le=90, description="comment lines on idle event streams (Cloudflare closes at 100 s)"
    )

    # -- exposure: authentication, limits, proxies ---------------------------------------------
    auth: AuthPolicy = Field(
        "auto", description="auto (whatever is configured), keys, access, either or both"
    )
    keys_file: Path = Field(
        default_factory=lambda: Path.home() / ".config" / "tunnelvision" / "keys.json",
        description="API key hashes (`tunnelvision keys add`); keys are required when it exists",
    )
    access_team_domain: str = Field(
        "", description="Cloudflare Access team, e.g. myteam(.cloudflareaccess.com)"
    )
    access_aud: str = Field("", description="Cloudflare Access application AUD tag")
    access_certs_url: str = Field("", description="JWKS URL override (default: the team's certs URL)")
    access_jwks_cooldown_s: float = Field(
        30.0, ge=0, description="least seconds between JWKS refreshes on an unknown key id"
    )
    access_jwks_lifespan_s: float = Field(
        300.0, gt=0, description="seconds the JWKS is trusted; a key removed from it stops working after"
    )
    insecure_no_auth: bool = Field(
        False, description="allow a non-loopback bind without authentication (warned at every start)"
    )
    public_docs: bool = Field(True, description="serve /docs and /openapi.json without authentication")
    public_metrics: bool = Field(False, description="serve /metrics without authentication")
    rate_limit_per_minute: float = Field(
        600.0, ge=0, description="requests per minute per key (per client address if anonymous); 0: off"
    )
    rate_limit_burst: int = Field(60, ge=1, description="requests a client may send at once")
    max_inflight_per_client: int = Field(
        16, ge=0, description="requests one client may have queued or running; 0: no cap"
    )
    trusted_proxies: str = Field(
        "127.0.0.1/8,::1/128",
        description="peers whose CF-Connecting-IP / X-Forwarded-For are believed (comma-separated)",
    )
    cors_origins: str = Field("", description="browser origins allowed by CORS (comma-separated); none")
    access_scopes: str = Field(
        "predict,jobs",
        pattern=r"^ *(predict|jobs|admin) *(, *(predict|jobs|admin) *)*$",
        description="what a Cloudflare Access login may call (comma-separated: predict, jobs, admin)",
    )

    label_studio_url: str = Field(
        "",
        pattern=r"^(https?://[^/?#\s]+/?)?$",
        description="Label Studio's URL, for task images when /label-studio/setup was not called "
        "since start (interactive calls do not send it); images come only from this host",
    )
    label_studio_api_key: str = Field(
        "",
        description="Label Studio API token for its task images (prefer the environment variable: "
        "a flag shows in the process list)",
    )

    @model_validator(mode="after")
    def _access_policy_needs_access_settings(self) -> Settings:
        if self.auth in ("access", "either", "both") and not self.access_configured:
            raise ValueError(f"auth={self.auth} needs access_team_domain and access_aud")
        return self

    @field_validator("pipeline")
    @classmethod
    def _pipelines_parse(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_pipeline(text)  # raises ValueError with the reason
        return value

    @model_validator(mode="after")
    def _pipeline_names_unique(self) -> Settings:
        names = [spec.name for spec in self.pipelines]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            why = f" ({GROUNDED_SAM} is the --detector/--segmenter pair)" if GROUNDED_SAM in repeated else ""
            raise ValueError(f"pipeline names must be unique: {', '.join(repeated)} given twice{why}")
        return self

    @property
    def pipelines(self) -> list[PipelineSpec]:
        """Every pipeline to serve, the default first."""
        given = [parse_pipeline(text) for text in self.pipeline]
        pair_given = bool({"detector", "segmenter"} & self.model_fields_set)
        if pair_given or self.demo or not given:
            return [PipelineSpec(GROUNDED_SAM, (self.detector, self.segmenter)), *given]
        return given

    @property
    def device_list(self) -> list[str]:
        return _comma_list(self.device) or ["auto"]

    @property
    def access_configured(self) -> bool:
        return bool(self.access_team_domain and self.access_aud)

    @property
    def keys_configured(self) -> bool:
        return self.keys_file.expanduser().is_file()

    @property
    def trusted_proxy_list(self) -> list[str]:
        return _comma_list(self.trusted_proxies)

    @property
    def cors_origin_list(self) -> list[str]:
        return _comma_list(self.cors_origins)

    @model_validator(mode="after")
    def _replica_range(self) -> Settings:
        if self.ray_max_replicas < self.ray_min_replicas:
            raise ValueError("ray_max_replicas must be at least ray_min_replicas")
        return self

    @field_validator("deadline_s")
    @classmethod
    def _under_cloudflare_timeout(cls, value: float) -> float:
        if value >= CLOUDFLARE_READ_TIMEOUT_S:
            raise ValueError(
                f"must be below Cloudflare's {CLOUDFLARE_READ_TIMEOUT_S:.0f} s read timeout, "
                "or clients get 524 instead of a JSON error"
            )
        return value


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]
