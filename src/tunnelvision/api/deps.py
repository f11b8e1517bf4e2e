"""Dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from tunnelvision.api.state import AppState
from tunnelvision.config import Settings
from tunnelvision.engine.engine import ANONYMOUS


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tunnelvision
    return state


def get_settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


def get_principal(request: Request) -> str | None:
    """Who GuardMiddleware recognised ('key:NAME', 'access:EMAIL'); None for anonymous callers."""
    principal = request.scope.get("state", {}).get("principal")
    return str(principal) if principal is not None else None


def get_owner(request: Request) -> str:
    """Whose jobs and cached images the request may see: one key (or Access identity), or all
    anonymous callers together when no authentication is configured."""
    owner = request.scope.get("state", {}).get("owner")
    return str(owner) if owner is not None else ANONYMOUS


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
PrincipalDep = Annotated[str | None, Depends(get_principal)]
OwnerDep = Annotated[str, Depends(get_owner)]


# Documentation only (the "Authorize" button in /docs): GuardMiddleware enforces authentication.
DOCUMENTED_AUTH = [
    Security(HTTPBearer(auto_error=False, description="an API key from `tunnelvision keys add`")),
    Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key, another header")),
]
