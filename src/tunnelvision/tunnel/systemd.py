"""systemd units: the API as a service, and the steps for cloudflared's own service."""

from __future__ import annotations

from tunnelvision.config import Settings

ENV_FILE = "/etc/tunnelvision/tunnelvision.env"


def api_unit(exec_start: str, user: str, settings: Settings, env_file: str = ENV_FILE) -> str:
    # SIGTERM fails the queue at once and lets the running request finish; give it the deadline.
    stop_timeout = int(settings.deadline_s) + 20
    return f"""[Unit]
Description=tunnelvision API (GroundingDINO + SAM)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
EnvironmentFile=-{env_file}
ExecStart={exec_start} serve
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
        lines.append(f"TUNNELVISION_{name.upper()}={getattr(settings, name)}")
    lines += [
        "# Behind a tunnel the API is public: require keys, even before the first one exists.",
        "TUNNELVISION_AUTH=keys",
        f"TUNNELVISION_KEYS_FILE={KEYS_FILE}",
        "# HF_HOME=/var/cache/huggingface",
    ]
    return "\n".join(lines) + "\n"


def next_steps(unit_path: str, env_path: str) -> str:
    return f"""Next steps:
  sudo install -D -m 644 {unit_path} /etc/systemd/system/tunnelvision.service
  sudo install -D -m 640 {env_path} {ENV_FILE}
  sudo tunnelvision keys --keys-file {KEYS_FILE} add me    # prints the key once
  sudo chown <service user> {KEYS_FILE}
  sudo systemctl daemon-reload && sudo systemctl enable --now tunnelvision

cloudflared, token route (tunnel created in the Cloudflare dashboard):
  sudo cloudflared service install <TOKEN>      # writes and starts cloudflared.service
  In the dashboard, add a public hostname whose service is http://127.0.0.1:<port>.

cloudflared, config-file route (tunnel created with `cloudflared tunnel create NAME`):
  tunnelvision tunnel config --hostname api.example.com --tunnel <UUID> \\
      --credentials-file /etc/cloudflared/<UUID>.json --out /etc/cloudflared/config.yml
  sudo cloudflared service install                # reads /etc/cloudflared/config.yml

Then: tunnelvision doctor --public-url https://api.example.com
"""
