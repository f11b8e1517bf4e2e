r"""systemd units: the API as a service, and the steps for cloudflared's own service.

Values are written by systemd's rules, so paths with spaces, `%`, `$` or quotes survive: in a unit
file `%` starts a specifier (`%%` is a literal one) and ExecStart= splits words at spaces (a quoted
word keeps them, with C escapes inside) and expands `$VAR` (`$$` is a literal one); an environment
file's values are taken whole when double-quoted, where `\\`, `\"`, `\$` and `` \` `` are escapes.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from tunnelvision.config import Settings

ENV_FILE = "/etc/tunnelvision/tunnelvision.env"
_NEEDS_QUOTES = re.compile(r"[\s\"'\\;]")
_ENV_PLAIN = re.compile(r"^[A-Za-z0-9_./:,+@=-]+$")


def unit_value(value: str) -> str:
    """A directive's value with specifiers disarmed."""
    return value.replace("%", "%%")


def exec_word(word: str, program: bool = False) -> str:
    """One ExecStart= word, kept one word and literal (`$` is expanded in arguments, not in the
    program's path)."""
    literal = unit_value(word) if program else unit_value(word).replace("$", "$$")
    if word and not _NEEDS_QUOTES.search(word):
        return literal
    return '"' + literal.replace("\\", "\\\\").replace('"', '\\"') + '"'


def env_value(value: str) -> str:
    """A value for an EnvironmentFile= line."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"{value!r}: an environment file value cannot hold a line break")
    if _ENV_PLAIN.match(value):
        return value
    return '"' + re.sub(r'(["\\`$])', r"\\\1", value) + '"'


def api_unit(command: Sequence[str], user: str, settings: Settings, env_file: str = ENV_FILE) -> str:
    """`command` is the tunnelvision executable as argv words, e.g. [path] or [python, -m, ...]."""
    # SIGTERM fails the queue at once and lets the running request finish; give it the deadline.
    stop_timeout = int(settings.deadline_s) + 20
    program, *arguments = [*command, "serve"]
    exec_start = " ".join([exec_word(program, program=True), *map(exec_word, arguments)])
    return f"""[Unit]
Description=tunnelvision API (GroundingDINO + SAM)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={unit_value(user)}
EnvironmentFile=-{unit_value(env_file)}
ExecStart={exec_start}
Restart=always
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout}
NoNewPrivileges=true
PrivateTmp=true

[Install]
WantedBy=multi-user.target
"""


KEYS_FILE = "/etc/tunnelvision/keys.json"


def env_file(settings: Settings) -> str:
    lines = ["# tunnelvision settings (see `tunnelvision serve --help`); one TUNNELVISION_NAME=value a line"]
    for name in ("detector", "segmenter", "device", "dtype", "host", "port"):
        lines.append(f"TUNNELVISION_{name.upper()}={env_value(str(getattr(settings, name)))}")
    lines += [
        "# Behind a tunnel the API is public: require keys, even before the first one exists.",
        "TUNNELVISION_AUTH=keys",
        f"TUNNELVISION_KEYS_FILE={KEYS_FILE}",
        "# HF_HOME=/var/cache/huggingface",
    ]
    return "\n".join(lines) + "\n"


def next_steps(unit_path: str, env_path: str, command: Sequence[str], user: str, port: int) -> str:
    """The lines to paste, as docs/DEPLOY.md has them: `command` is the tunnelvision executable by
    its full path (sudo's PATH lacks a venv's bin), `user` the service's."""
    unit_path, env_path = shlex.quote(unit_path), shlex.quote(env_path)  # shell lines to paste
    tunnelvision = shlex.join(command)
    return f"""Next steps:
  sudo install -D -m 644 {unit_path} /etc/systemd/system/tunnelvision.service
  sudo install -D -m 640 {env_path} {ENV_FILE}
  sudo {tunnelvision} keys add me --keys-file {KEYS_FILE}    # prints the key once
  sudo chown {shlex.quote(user)} {KEYS_FILE}
  sudo systemctl daemon-reload && sudo systemctl enable --now tunnelvision

cloudflared, token route (tunnel created in the Cloudflare dashboard):
  sudo cloudflared service install <TOKEN>      # writes and starts cloudflared.service
  In the dashboard, add a public hostname whose service is http://127.0.0.1:{port}.

cloudflared, config-file route (tunnel created with `cloudflared tunnel create NAME`):
  sudo mkdir -p /etc/cloudflared && sudo cp ~/.cloudflared/<UUID>.json /etc/cloudflared/
  {tunnelvision} tunnel config --hostname api.example.com --tunnel <UUID> \\
      --credentials-file /etc/cloudflared/<UUID>.json --port {port} --out /tmp/config.yml
  sudo cp /tmp/config.yml /etc/cloudflared/config.yml && sudo cloudflared service install

Then: {tunnelvision} doctor --public-url https://api.example.com
"""
