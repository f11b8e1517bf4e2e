"""The playground page at `/`: plain HTML and JS, relative URLs, so it works through the tunnel."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


@cache
def page() -> str:
    return resources.files("tunnelvision.api").joinpath("static/playground.html").read_text("utf-8")


@router.get("/")
async def playground() -> HTMLResponse:
    return HTMLResponse(page())
