"""Dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tunnelvision.api.state import AppState
from tunnelvision.config import Settings


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tunnelvision
    return state


def get_settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
