"""The HTML pages: the playground at `/` (plain HTML and JS, relative URLs, so it works through the
tunnel) and the API docs (/docs, /redoc). Each carries a Content-Security-Policy that allows exactly
what that page loads; inline scripts and styles are allowed by their hash, never by 'unsafe-inline'
for scripts. The docs load Swagger UI and ReDoc from this server (files of the fastapi-offline
package), so they work on a box with no internet and trust no CDN."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import metadata, resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse, Response

from tunnelvision.errors import NotFound

router = APIRouter(include_in_schema=False)

OAUTH2_REDIRECT = "/docs/oauth2-redirect"
# The files the docs pages need, by name in the package's static folder, and their media types.
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
# The asset URLs carry the package version, so a browser may keep them until an upgrade.
ASSET_CACHE_CONTROL = "public, max-age=31536000, immutable"
CLOSING = "base-uri 'none'; frame-ancestors 'none'"

# `{scripts}` / `{styles}` become the hashes of the page's own inline elements. media-src: the
# video overlay plays from a blob: URL (fetched with the key, which a <video src> cannot send).
PLAYGROUND_CSP = (
    "default-src 'none'; script-src {scripts}; style-src {styles}; "
    "img-src 'self' blob: data:; media-src blob:; connect-src 'self'; form-action 'none'; " + CLOSING
)
# Swagger UI sets inline styles from its scripts, so styles need 'unsafe-inline' (a hash would
# switch it off); scripts are its bundle from here plus the page's one inline start-up script.
SWAGGER_CSP = (
    "default-src 'none'; script-src 'self' {scripts}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; " + CLOSING
)
# ReDoc injects <style> elements (styled-components) and runs its search index in a blob: worker.
REDOC_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; "
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


@cache
def assets_folder() -> Path:
    return Path(str(resources.files("fastapi_offline").joinpath("static")))


@cache
def asset_url(name: str) -> str:
    """Under the page's own path, so the guard's rule for /docs covers its assets too (public
    exactly when the page is) with no second list of paths to keep in step."""
    return f"/docs?asset={name}&v={metadata.version('fastapi-offline')}"


def docs_asset(name: str) -> Response:
    if name not in DOCS_ASSETS:  # only the listed files, never a path into the package
        raise NotFound(f"no docs asset '{name}'")
    return FileResponse(
        assets_folder() / name,
        media_type=DOCS_ASSETS[name],
        headers={"Cache-Control": ASSET_CACHE_CONTROL},
    )


@router.get("/docs")
async def swagger_ui(request: Request, asset: str | None = None) -> Response:
    if asset is not None:
        return docs_asset(asset)
    app: FastAPI = request.app
    html = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} - Swagger UI",
        swagger_js_url=asset_url("swagger-ui-bundle.js"),
        swagger_css_url=asset_url("swagger-ui.css"),
        swagger_favicon_url=asset_url("favicon.png"),
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
    html = get_redoc_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} - ReDoc",
        redoc_js_url=asset_url("redoc.standalone.js"),
        redoc_favicon_url=asset_url("favicon.png"),
        with_google_fonts=False,
    )
    return with_policy(html, REDOC_CSP)
