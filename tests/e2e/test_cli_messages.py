"""What the `tunnelvision` command says when it is used wrongly: a bad flag, a bad TUNNELVISION_*
variable, a broken keys file. One short message that names the flag, the variable or the file, in
our words (no pydantic report, no traceback, not 20 lines of usage), and a non-zero exit."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from support import run_tunnelvision

pytestmark = pytest.mark.e2e


def tunnelvision(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Only the test's own TUNNELVISION_* variables, whatever the shell running the tests has set.
    return run_tunnelvision(*args, env={"COLUMNS": "80", **(env or {})}, inherit_settings=False)


def assert_said_in_words(result: subprocess.CompletedProcess[str], code: int) -> list[str]:
    """The exit code, nothing on stdout, and stderr without pydantic's or Python's reports."""
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    for leak in ("Traceback", "pydantic", "validation error", "[type=", "input_value"):
        assert leak not in result.stderr, result.stderr
    return result.stderr.splitlines()


# -- serve --help ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "up"])
def test_settings_flags_state_one_default_each_in_words(command: str) -> None:
    result = tunnelvision(command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "PydanticUndefined" not in text
    # One flag's help ends at its "env TUNNELVISION_NAME)"; none says "(default:" twice.
    helps = text.split("env TUNNELVISION_")[:-1]
    assert len(helps) >= 50
    doubled = [help_text[-120:] for help_text in helps if help_text.count("(default:") > 1]
    assert doubled == []
    assert "(default: ;" not in text  # an empty default is "none"
    assert "--access-aud ACCESS_AUD Cloudflare Access application AUD tag (default: none;" in text
    assert "JWKS URL override (default: the team's certs URL) (env TUNNELVISION_ACCESS_CERTS_URL)" in text
    assert "(default: 100.0; env TUNNELVISION_DEADLINE_S)" in text


# -- settings: flags and variables -------------------------------------------------------------


def test_a_bad_flag_value_names_the_flag_and_its_variable() -> None:
    for command in ("serve", "up"):
        lines = assert_said_in_words(tunnelvision(command, "--deadline-s", "200"), 2)
        assert lines == [
            f"tunnelvision {command}: --deadline-s (TUNNELVISION_DEADLINE_S): must be below Cloudflare's "
            "125 s read timeout, or clients get 524 instead of a JSON error (got 200.0)"
        ]
    lines = assert_said_in_words(tunnelvision("serve", "--port", "0", "--max-batch", "100"), 2)
    assert lines == [
        "tunnelvision serve: --port (TUNNELVISION_PORT): input should be greater than or equal to 1 (got 0)",
        "tunnelvision serve: --max-batch (TUNNELVISION_MAX_BATCH): input should be less than or equal "
        "to 64 (got 100)",
    ]


def test_a_bad_variable_for_serve_names_it_too() -> None:
    lines = assert_said_in_words(tunnelvision("serve", env={"TUNNELVISION_PORT": "abc"}), 2)
    assert lines == [
        "tunnelvision serve: --port (TUNNELVISION_PORT): input should be a valid integer, "
        "unable to parse string as an integer (got 'abc')"
    ]
    lines = assert_said_in_words(tunnelvision("serve", env={"TUNNELVISION_PIPELINE": "sam=x"}), 2)
    assert lines == [
        """tunnelvision serve: TUNNELVISION_PIPELINE: must be a JSON list, """
        """e.g. TUNNELVISION_PIPELINE='["first", "second"]'"""
    ]


def test_a_rule_across_settings_names_the_flags_and_variables() -> None:
    lines = assert_said_in_words(tunnelvision("serve", "--auth", "access"), 2)
    assert lines == [
        "tunnelvision serve: auth=access needs --access-team-domain (TUNNELVISION_ACCESS_TEAM_DOMAIN) "
        "and --access-aud (TUNNELVISION_ACCESS_AUD)"
    ]


@pytest.mark.parametrize(
    ("where", "args"),
    [
        ("keys list", []),
        ("keys add", ["me"]),
        ("doctor", []),
        ("tunnel systemd", ["--out-dir", "OUT"]),
    ],
)
def test_commands_that_read_the_settings_name_a_bad_variable(
    where: str, args: list[str], tmp_path: Path
) -> None:
    """These commands have no settings flags: the variable alone is named, and nothing is done."""
    command = [*where.split(), *(str(tmp_path / "out") if arg == "OUT" else arg for arg in args)]
    cases = {
        "TUNNELVISION_PORT": (
            "abc",
            "TUNNELVISION_PORT: input should be a valid integer, unable to parse string as an integer "
            "(got 'abc')",
        ),
        "TUNNELVISION_DEADLINE_S": ("300", "TUNNELVISION_DEADLINE_S: must be below Cloudflare's 125 s"),
        "TUNNELVISION_PIPELINE": ("not json", "TUNNELVISION_PIPELINE: must be a JSON list, e.g."),
        "TUNNELVISION_AUTH": ("access", "auth=access needs TUNNELVISION_ACCESS_TEAM_DOMAIN and"),
    }
    for variable, (value, said) in cases.items():
        env = {variable: value, "TUNNELVISION_KEYS_FILE": str(tmp_path / "keys.json")}
        lines = assert_said_in_words(tunnelvision(*command, env=env), 2)
        assert len(lines) == 1 and lines[0].startswith(f"tunnelvision {where}: {said}"), lines
    assert list(tmp_path.iterdir()) == []  # no key added, no unit written


# -- argparse's own errors -----------------------------------------------------------------------


def test_a_flag_argparse_refuses_gets_the_commands_short_usage_and_a_pointer_to_help() -> None:
    lines = assert_said_in_words(tunnelvision("serve", "--port", "abc"), 2)
    assert lines == [
        "usage: tunnelvision serve [options]",
        "tunnelvision serve: error: argument --port: invalid int value: 'abc'",
        "see `tunnelvision serve --help`",
    ]
    lines = assert_said_in_words(tunnelvision("serve", "--dtype", "int3"), 2)
    assert lines[0] == "usage: tunnelvision serve [options]" and "invalid choice: 'int3'" in lines[1]
    assert len(lines) == 3


def test_an_unknown_flag_is_reported_by_the_command_it_was_given_to() -> None:
    lines = assert_said_in_words(tunnelvision("up", "--no-such-flag", "1"), 2)
    assert lines == [
        "usage: tunnelvision up [options]",
        "tunnelvision up: error: unrecognized arguments: --no-such-flag 1",
        "see `tunnelvision up --help`",
    ]
    lines = assert_said_in_words(tunnelvision("keys", "add", "me", "--bogus"), 2)
    assert lines[1:] == [
        "tunnelvision keys add: error: unrecognized arguments: --bogus",
        "see `tunnelvision keys add --help`",
    ]
    assert lines[0].startswith("usage: tunnelvision keys add ") and lines[0].endswith(" name")


def test_a_missing_subcommand_is_named_by_its_choices() -> None:
    lines = assert_said_in_words(tunnelvision("keys"), 2)
    assert lines[0].startswith("usage: tunnelvision keys ")
    assert lines[1:] == [
        "tunnelvision keys: error: the following arguments are required: {add,list,revoke}",
        "see `tunnelvision keys --help`",
    ]
    lines = assert_said_in_words(tunnelvision(), 2)
    assert len(lines) == 3 and re.fullmatch(
        r"usage: tunnelvision \[options\] \{serve,up,.*\} \.\.\.", lines[0]
    )


# -- the keys file -------------------------------------------------------------------------------

SHA = "0" * 64


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("keys: []\n", "is not valid JSON (Expecting value: line 1 column 1)"),
        ("[]", 'has no "keys" list (it holds an array;'),
        ('{"key": []}', 'has no "keys" list (the object lacks it;'),
        ('{"keys": {"a": 1}}', 'has no "keys" list (its "keys" is an object;'),
        (
            '{"keys": ["tv_abc"]}',
            'entry 1 lacks a "name" or a valid "sha256" (it is a string, not an object)',
        ),
        ('{"keys": [{"name": "ci"}]}', 'entry 1 lacks a "name" or a valid "sha256" (no "sha256")'),
        (f'{{"keys": [{{"sha256": "{SHA}"}}]}}', 'entry 1 lacks a "name" or a valid "sha256" (no "name")'),
        ('{"keys": [{"name": "ci", "sha256": "tv_abc"}]}', '("sha256" is not 64 lowercase hex digits)'),
        ('{"keys": ' + "1" * 5000 + "}", "holds a number too long to read"),
    ],
    ids=[
        "yaml",
        "array",
        "no-keys",
        "keys-object",
        "plain-key",
        "no-hash",
        "no-name",
        "bad-hash",
        "huge-number",
    ],
)
def test_keys_commands_on_a_broken_keys_file_say_which_file_and_what_is_wrong(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    for command in (["list"], ["add", "ops"], ["revoke", "ops"]):
        result = tunnelvision("keys", *command, "--keys-file", str(path))
        lines = assert_said_in_words(result, 1)
        assert len(lines) == 1 and lines[0].startswith(
            f"tunnelvision keys {command[0]}: the keys file {path}"
        )
        assert problem in lines[0] and lines[0].endswith("; fix or restore it first")
    assert path.read_text() == content  # never overwritten


def test_keys_commands_on_a_folder_or_an_unusable_variable_path(tmp_path: Path) -> None:
    folder = tmp_path / "keys.json"
    folder.mkdir()
    for command in (["list"], ["add", "ops"]):
        by_flag = tunnelvision("keys", "--keys-file", str(folder), *command)
        by_variable = tunnelvision("keys", *command, env={"TUNNELVISION_KEYS_FILE": str(folder)})
        for result in (by_flag, by_variable):
            lines = assert_said_in_words(result, 1)
            assert lines == [
                f"tunnelvision keys {command[0]}: the keys file {folder} is a folder, not a file; "
                "fix or restore it first"
            ]
    assert list(folder.iterdir()) == []
