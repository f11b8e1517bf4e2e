"""The HTML pages: the playground at `/` (plain HTML and JS, relative URLs, so it works through the
tunnel) and the API docs (/docs, /redoc). Each carries a Content-Security-Policy that allows exactly
what that page loads; inline scripts and styles are allowed by their hash, never by 'unsafe-inline'
for scripts."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)

OAUTH2_REDIRECT = "/docs/oauth2-redirect"
CDN = "https://cdn.jsdelivr.net"  # where FastAPI's docs pages load Swagger UI and ReDoc from
FASTAPI_FAVICON = "https://fastapi.tiangolo.com"
CLOSING = "base-uri 'none'; frame-ancestors 'none'"

# `{scripts}` / `{styles}` become the hashes of the page's own inline elements.
PLAYGROUND_CSP = (
    "default-src 'none'; script-src {scripts}; style-src {styles}; "
    "img-src 'self' blob: data:; connect-src 'self'; form-action 'none'; " + CLOSING
)
# Swagger UI sets inline styles from its scripts, so styles need 'unsafe-inline' (a hash would
# switch it off); scripts come from the CDN plus the page's one inline start-up script.
SWAGGER_CSP = (
    f"default-src 'none'; script-src {CDN} {{scripts}}; style-src {CDN} 'unsafe-inline'; "
    f"img-src 'self' data: {FASTAPI_FAVICON}; connect-src 'self'; form-action 'self'; " + CLOSING
)
# ReDoc injects <style> elements (styled-components), fetches Google Fonts, shows Redocly's logo
# and runs its search index in a blob: worker.
REDOC_CSP = (
    f"default-src 'none'; script-src {CDN}; style-src 'unsafe-inline' https://fonts.googleapis.com; "
    f"font-src https://fonts.gstatic.com; img-src 'self' data: {FASTAPI_FAVICON} https://cdn.redoc.ly; "
    "connect-src 'self'; worker-src blob:; form-action 'none'; " + CLOSING
)
OAUTH2_REDIRECT_CSP = "default-src 'none'; script-src {scripts}; form-action 'none'; " + CLOSING


@cache
def page() -> str:
    return resources.files("tunnelvision.api").joinpath("static/playground.html").read_text("utf-8")


def inline_hashes(html: str, tag: str) -> str:
    """CSP sources for the page's inline <script> or <style> elements (those without src)."""
    pattern = re.compile(rf"<{tag}\b(?![^>]*\bsrc=)[^>]*>(.*?)</{tag}>", re.S | re.I)
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in pattern.findall(html)
    ]
    return " ".join(hashes) or "'none'"


def with_policy(response: HTMLResponse, template: str) -> HTMLResponse:
    html = bytes(response.body).decode()
    policy = template.format(scripts=inline_hashes(html, "script"), styles=inline_hashes(html, "style"))
    response.headers["Content-Security-Policy"] = policy
    return response


@router.get("/")
async def playground() -> HTMLResponse:
    return with_policy(HTMLResponse(page()), PLAYGROUND_CSP)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    html = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=OAUTH2_REDIRECT,
        init_oauth=app.swagger_ui_init_oauth,
        swagger_ui_parameters=app.swagger_ui_parameters,
    )
    return with_policy(html, SWAGGER_CSP)


@router.get(OAUTH2_REDIRECT)
async def swagger_ui_redirect() -> HTMLResponse:
    return with_policy(get_swagger_ui_oauth2_redirect_html(), OAUTH2_REDIRECT_CSP)


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    html = get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - ReDoc")
    return with_policy(html, REDOC_CSP)
