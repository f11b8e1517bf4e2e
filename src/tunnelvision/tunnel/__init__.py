"""Cloudflare Tunnel tooling: cloudflared config, systemd units, quick tunnels, doctor."""
