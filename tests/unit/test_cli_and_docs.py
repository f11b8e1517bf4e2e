from __future__ import annotations

from pathlib import Path

import pytest

from tunnelvision.cli import build_parser, main, settings_from_args
from tunnelvision.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_a_serve_flag_and_flags_override_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNNELVISION_MAX_QUEUE", "5")
    monkeypatch.setenv("TUNNELVISION_PORT", "9000")
    args = build_parser().parse_args(["serve", "--port", "9100", "--no-warmup", "--dtype", "bfloat16"])
    settings = settings_from_args(args)
    assert (settings.port, settings.max_queue, settings.warmup) == (9100, 5, False)
    assert settings.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text


def test_the_readme_documents_every_setting() -> None:
    readme = README.read_text()
    for name in Settings.model_fields:
        assert f"TUNNELVISION_{name.upper()}" in readme, name


def test_defaults_are_safe_behind_cloudflare() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.keep_alive_s > 90 and settings.deadline_s < 125
    assert settings.max_body_bytes < 100_000_000
