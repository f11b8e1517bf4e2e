"""Dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from tunnelvision.api.state import AppState
from tunnelvision.config import Settings


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tunnelvision
    return state


def get_settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


def get_principal(request: Request) -> str | None:
    """Who GuardMiddleware recognised ('key:NAME', 'access:EMAIL'); None for anonymous callers."""
    principal = request.scope.get("state", {}).get("principal")
    return str(principal) if principal is not None else None


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
PrincipalDep = Annotated[str | None, Depends(get_principal)]


# Documentation only (the "Authorize" button in /docs): GuardMiddleware enforces authentication.
DOCUMENTED_AUTH = [
    Security(HTTPBearer(auto_error=False, description="an API key from `tunnelvision keys add`")),
    Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key, another header")),
]
