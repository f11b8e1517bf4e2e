"""`tunnelvision tunnel quick`: a throwaway trycloudflare.com URL for the local API."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TextIO

INSTALL_HINT = (
    "install cloudflared: Debian/Ubuntu via Cloudflare's apt repository "
    "(pkg.cloudflare.com), or the .deb from github.com/cloudflare/cloudflared/releases, "
    "or the cloudflare/cloudflared Docker image"
)
# The tunnel's own hostname; api.trycloudflare.com is the service cloudflared asks for one.
URL_PATTERN = re.compile(r"https://(?!api\.)[a-z0-9-]+\.trycloudflare\.com")
LIMITS = (
    "Quick tunnels have no SLA and allow at most 200 in-flight requests (then 429). "
    "For a stable hostname use a named tunnel: `tunnelvision tunnel config`."
)


def config_file_warning() -> str | None:
    if not Path("~/.cloudflared/config.yml").expanduser().is_file():
        return None
    return (
        "warning: ~/.cloudflared/config.yml exists; cloudflared refuses quick tunnels while it "
        "does (move it aside)"
    )


def run_quick_tunnel(port: int, out: TextIO = sys.stdout) -> int:
    binary = shutil.which("cloudflared")
    if binary is None:
        print(f"cloudflared is not installed: {INSTALL_HINT}", file=out)
        return 1
    warning = config_file_warning()
    if warning:
        print(warning, file=out)
    command = [binary, "tunnel", "--no-autoupdate", "--url", f"http://127.0.0.1:{port}"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        announced = False
        for line in process.stdout:
            match = URL_PATTERN.search(line)
            if match and not announced:
                announced = True
                print(f"\nPublic URL: {match.group(0)}  ->  http://127.0.0.1:{port}\n{LIMITS}\n", file=out)
                out.flush()
        return process.wait()
