"""Label Studio's ML backend protocol under /label-studio: paste `https://HOST/label-studio`
into a project's "Connect model" dialog (Basic auth, the key as the password)."""

from __future__ import annotations

from fastapi import APIRouter

from tunnelvision.api.guard import LABEL_STUDIO_PREFIX

router = APIRouter(prefix=LABEL_STUDIO_PREFIX, tags=["label-studio"])
