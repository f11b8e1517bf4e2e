from __future__ import annotations

from pathlib import Path

import pytest

from tunnelvision.errors import ModelUnavailable
from tunnelvision.models.loading import resolve_device, resolve_dtype, resolve_source


def test_local_folders_load_without_the_hub(tiny_models: tuple[Path, Path]) -> None:
    source = resolve_source(str(tiny_models[0]), "detector")
    assert source.local_files_only and source.location == str(tiny_models[0])


def test_missing_or_empty_folders_fail_with_their_name(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_source(str(tmp_path / "nope"), "detector")
    with pytest.raises(ModelUnavailable, match=r"no config\.json"):
        resolve_source(str(tmp_path), "segmenter")


def test_unreachable_hub_fails_fast_naming_model_cache_and_remedies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable) as caught:
        resolve_source("someone/not-cached-model", "detector")
    message = caught.value.message
    assert "someone/not-cached-model" in message and "Cache folder" in message
    assert "--detector /path/to/folder" in message and "--demo" in message


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ModelUnavailable, match="float16"):
        resolve_dtype("float16", resolve_device("cpu"))
