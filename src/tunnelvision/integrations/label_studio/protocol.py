"""The ML backend protocol's messages, as Label Studio sends and reads them, and what this server
keeps between them (bounded: who holds a key must not grow it without end)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from tunnelvision.integrations.label_studio.config import LabelConfig
from tunnelvision.integrations.label_studio.images import ImageSource

V = TypeVar("V")
MAX_TASKS = 1000  # tasks in one /predict
# Interactive calls carry the task's earlier predictions and annotations (brush RLEs are long
# lists of small numbers): more values than our other JSON routes take, still bounded.
MAX_JSON_VALUES = 2_000_000
MAX_PROJECTS = 256  # setups remembered (per server, all keys together)
MAX_TASK_IMAGES = 4096  # task image -> image_id entries (per server, all keys together)


class ModelOptions(BaseModel):
    """`extra_params` of the ML backend in Label Studio (JSON): the pipeline and its thresholds."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, max_length=64, description="the pipeline (GET /v1/models); default: the first"
    )
    box_threshold: float | None = Field(None, ge=0.0, le=1.0)
    text_threshold: float | None = Field(None, ge=0.0, le=1.0)
    nms_iou: float | None = Field(None, ge=0.0, le=1.0)
    max_detections: int | None = Field(None, ge=1, le=900)

    def detect_fields(self) -> dict[str, Any]:
        """The thresholds given, as DetectParams fields (the others keep their defaults)."""
        return self.model_dump(exclude_none=True)


class SetupRequest(BaseModel):
    project: str = Field("", max_length=128, description="'ID.CREATED_AT' of the Label Studio project")
    schema_: str | None = Field(
        None, alias="schema", max_length=256 * 1024, description="the labeling config"
    )
    hostname: str | None = Field(None, max_length=2048, description="Label Studio's URL")
    access_token: str | None = Field(None, max_length=4096, description="its API token (for task images)")
    extra_params: dict[str, Any] | str | None = Field(
        None, description='JSON, e.g. {"model": "grounded-sam", "box_threshold": 0.3}'
    )


class SetupResponse(BaseModel):
    model_version: str = Field(..., description="PIPELINE@GENERATION: a reload makes a new version")


class HealthResponse(BaseModel):
    status: str = Field(..., examples=["UP"])
    model_class: str


class PredictResponse(BaseModel):
    results: list[dict[str, Any]] = Field(
        ...,
        description="one per task, in order: {result: [regions], score, model_version}; a task that "
        "failed has `error` {code, message} instead of `result` (Label Studio keeps no prediction and "
        "asks again next time)",
    )


class WebhookResponse(BaseModel):
    status: str


class PredictRequest(BaseModel):
    """What /predict reads of Label Studio's body (tasks keep only `id` and `data`)."""

    tasks: list[dict[str, Any]] = Field(..., max_length=MAX_TASKS)
    project: str = Field("", max_length=128)
    label_config: str | None = Field(None, max_length=256 * 1024)
    params: dict[str, Any] | None = None

    @property
    def context(self) -> list[dict[str, Any]]:
        """The regions an annotator just placed with a smart tool (empty: pre-annotation)."""
        context = (self.params or {}).get("context") or {}
        result = context.get("result") if isinstance(context, dict) else None
        return [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []


@dataclass(frozen=True)
class ProjectSetup:
    """What /setup told us about one project, for its later /predict calls."""

    config: LabelConfig | None
    source: ImageSource | None
    options: ModelOptions


class BoundedMap(Generic[V]):
    """Least recently used entries go first once `capacity` is reached (event loop only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class Memory:
    """Per server: project setups and the image_id of each task image, both by owner (one key
    never sees what another key's Label Studio set up)."""

    def __init__(self) -> None:
        self.setups: BoundedMap[ProjectSetup] = BoundedMap(MAX_PROJECTS)
        self.images: BoundedMap[str] = BoundedMap(MAX_TASK_IMAGES)
