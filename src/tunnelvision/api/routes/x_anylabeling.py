"""X-AnyLabeling's remote-server protocol under /x-anylabeling: its desktop client's
"Remote-Server" model points at `https://HOST/x-anylabeling` with our key."""

from __future__ import annotations

from fastapi import APIRouter

from tunnelvision.api.guard import X_ANYLABELING_PREFIX

router = APIRouter(prefix=X_ANYLABELING_PREFIX, tags=["x-anylabeling"])
