from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tunnelvision.cli import add_settings_flags, build_parser, main, settings_from_args
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


@pytest.mark.parametrize("where", ["before", "after"])
def test_keys_file_is_accepted_before_or_after_the_keys_command(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = str(tmp_path / "keys.json")

    def keys_command(*words: str) -> int:
        flag = ["--keys-file", keys]
        return main(["keys", *flag, *words] if where == "before" else ["keys", *words, *flag])

    assert keys_command("add", "me") == 0
    assert capsys.readouterr().out.startswith("tv_")
    assert keys_command("list") == 0
    assert capsys.readouterr().out.startswith("me\t")
    assert keys_command("revoke", "me") == 0
    assert keys_command("list") == 0
    assert capsys.readouterr().out == ""
    assert Path(keys).is_file()


def test_up_takes_every_serve_flag_and_hands_them_to_serve() -> None:
    from tunnelvision.tunnel.up import serve_command

    given = ["up", "--port", "9100", "--no-warmup", "--data-dir", "/srv/tv data", "--cors-origins=-x"]
    args = build_parser().parse_args(given)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    command = serve_command(overrides)
    assert command[1:4] == ["-m", "tunnelvision.cli", "serve"]
    served = settings_from_args(build_parser().parse_args(command[3:]))
    assert (served.port, served.warmup, str(served.data_dir)) == (9100, False, "/srv/tv data")
    assert served.cors_origins == "-x"


@pytest.mark.parametrize("command", [["list"], ["add", "ops"], ["revoke", "ops"]])
def test_keys_commands_on_an_unusable_keys_file_print_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    broken = tmp_path / "keys.json"
    broken.write_text('{"keys": [')  # truncated
    folder = tmp_path / "folder.json"
    folder.mkdir()
    for path in (broken, folder):
        assert main(["keys", *command, "--keys-file", str(path)]) == 1
        error = capsys.readouterr().err
        assert str(path) in error and "Traceback" not in error
    assert broken.read_text() == '{"keys": ['  # never overwritten


def test_a_bad_environment_variable_is_a_message_in_every_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNNELVISION_PORT", "not-a-port")
    assert main(["keys", "list"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tunnelvision keys list: TUNNELVISION_PORT: input should be a valid integer")
    assert "'not-a-port'" in error and "pydantic" not in error


class WithRequired(BaseSettings):
    """A settings model with a field that has no default (Settings has none today)."""

    model_config = SettingsConfigDict(env_prefix="APP_")

    token: str = Field(description="a token")
    ratio: float = Field(0.5, description="share of 100% (default: half)")
    names: list[str] = Field(default_factory=list, description="names")


def test_flag_help_never_shows_pydantics_placeholder_nor_two_defaults() -> None:
    parser = argparse.ArgumentParser(prog="x")
    add_settings_flags(parser, WithRequired)
    text = " ".join(parser.format_help().split())
    assert "PydanticUndefined" not in text
    assert "--token TOKEN a token (default: none, required; env APP_TOKEN)" in text
    assert "--ratio RATIO share of 100% (default: half) (env APP_RATIO)" in text  # its own, once
    assert "--names NAMES names (default: none; env APP_NAMES)" in text


def test_models_random_writes_one_family_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "random", str(tmp_path / "sam"), "--family", "sam"]) == 0
    assert (tmp_path / "sam" / "config.json").is_file() and (tmp_path / "sam" / "model.safetensors").is_file()
    assert "sam, tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse lists the known families
        main(["models", "random", str(tmp_path / "x"), "--family", "yolo"])


def test_server_commands_without_the_server_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A base install has none of the server's packages (the e2e base-install test runs one);
    here two that no install has stand in for them."""
    from tunnelvision import cli

    monkeypatch.setattr(cli, "SERVER_MODULES", ("tunnelvision_no_torch", "tunnelvision_no_fastapi"))
    for words, command in (
        ("serve", ["serve"]),
        ("up", ["up"]),
        ("models random", ["models", "random", str(tmp_path / "out")]),
    ):
        assert main(command) == 1
        error = capsys.readouterr().err
        assert error == f"tunnelvision {words}: this needs the server: pip install 'tunnelvision[server]'\n"
    assert not (tmp_path / "out").exists()
    # partly installed: it says which are missing
    monkeypatch.setattr(cli, "SERVER_MODULES", ("json", "tunnelvision_no_torch"))
    assert main(["serve"]) == 1
    assert "(tunnelvision_no_torch missing)" in capsys.readouterr().err
