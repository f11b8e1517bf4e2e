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


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


# Documentation only (the "Authorize" button in /docs): GuardMiddleware enforces authentication.
DOCUMENTED_AUTH = [
    Security(HTTPBearer(auto_error=False, description="an API key from `tunnelvision keys add`")),
    Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key, another header")),
]
