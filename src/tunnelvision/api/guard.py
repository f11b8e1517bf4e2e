"""Who may call, how often, how much at once: one ASGI middleware in front of the routes.

Order of checks: client address (proxy trust) -> authentication -> scope -> rate limit ->
in-flight cap. None of it reads the body, so a refused client costs no upload, with one
exception: Roboflow's inference-sdk puts its key in the JSON body, so on its routes (KEY_IN_BODY)
a request that brings no key elsewhere has its body read (within `max_body_bytes`) for it.

Scopes are decided here, in one table (SCOPE_RULES), not by each route: a protected path the
table does not name needs `admin`, so a route added without a row is closed, not open.

The policy is settled when the server starts and only ever tightens while it runs: a keys file
that breaks or disappears keeps its last good keys (KeyStore), one that appears turns keys on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunnelvision.api.middleware import HttpMiddleware, send_error
from tunnelvision.api.parsing import load_json
from tunnelvision.config import Settings
from tunnelvision.errors import (
    Forbidden,
    MalformedInput,
    PayloadTooLarge,
    RateLimited,
    TooManyInFlight,
    TunnelvisionError,
    Unauthorized,
)
from tunnelvision.security.access import AccessDenied, AccessVerifier
from tunnelvision.security.keys import KeyStore, parse_scopes
from tunnelvision.security.proxy import client_address, parse_networks
from tunnelvision.security.ratelimit import InflightLimiter, RateLimiter

LABEL_STUDIO_PREFIX = "/label-studio"  # Label Studio's ML backend protocol (api/routes/label_studio.py)
X_ANYLABELING_PREFIX = "/x-anylabeling"  # X-AnyLabeling's remote server protocol
ALWAYS_PUBLIC = frozenset(
    {
        "/healthz",
        "/readyz",
        "/",  # the playground page (it asks for a key)
        f"{LABEL_STUDIO_PREFIX}/webhook",  # Label Studio sends its events without the backend's auth
        f"{X_ANYLABELING_PREFIX}/health",  # X-AnyLabeling probes it without its key
    }
)
# Roboflow Inference's routes: inference-sdk sends the key as `api_key` in the JSON body (or the
# query). Only here is a key taken from there: query strings end up in proxies' logs.
KEY_IN_BODY = re.compile(r"/(sam2|sam3|grounding_dino)/[a-z_]+")
# Public, but a caller who sends valid credentials is recognised (and told more).
OPTIONAL_AUTH = frozenset({"/readyz"})
DOCS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
WWW_AUTHENTICATE = 'Bearer realm="tunnelvision"'

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScopeRule:
    methods: frozenset[str]  # empty: any method
    path: re.Pattern[str]  # matched against the whole path
    scope: str | None  # None: any caller who authenticated

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method in self.methods) and self.path.fullmatch(path) is not None


def _rule(methods: str, path: str, scope: str | None) -> ScopeRule:
    return ScopeRule(frozenset(methods.split()), re.compile(path), scope)


# The first rule that matches decides; a protected path none matches needs DEFAULT_SCOPE.
SCOPE_RULES = (
    _rule("", r"/v1/(detect|segment|annotate)", "predict"),
    _rule("GET HEAD", r"/v1/models(/[^/]+)?", "predict"),  # what is served (reading only)
    _rule("POST", r"/v1/models/[^/]+/reload", "admin"),  # swapping weights
    _rule("", r"/v1/jobs(/.*)?", "jobs"),
    _rule("", r"/v1/videos(/.*)?", "jobs"),  # video jobs: uploads, results, live events
    _rule("", r"/metrics", "admin"),  # when not --public-metrics
    _rule("", KEY_IN_BODY.pattern, "predict"),  # Roboflow-shaped routes
    _rule("", re.escape(LABEL_STUDIO_PREFIX) + r"/.*", "predict"),
    _rule("", re.escape(X_ANYLABELING_PREFIX) + r"/.*", "predict"),
    _rule("", "|".join(re.escape(path) for path in sorted(DOCS)), None),  # --no-public-docs
)
DEFAULT_SCOPE = "admin"


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs (None: only to be authenticated)."""
    if any(segment in (".", "..") for segment in path.split("/")):
        return DEFAULT_SCOPE  # the router does not resolve dot segments; nor should the table
    for rule in SCOPE_RULES:
        if rule.matches(method, path):
            return rule.scope
    return DEFAULT_SCOPE


@dataclass(frozen=True)
class Caller:
    principal: str  # who, for logs and limits: 'key:NAME', 'access:EMAIL'
    owner: str  # whose jobs and images: one key's, even if a later key reuses its name
    scopes: tuple[str, ...]  # what it may call (SCOPE_RULES)
    credential: str  # what it showed, for messages: 'key', 'Cloudflare Access login'

    def lacking(self, method: str, path: str) -> str | None:
        """The scope this request needs that this caller lacks; None when it may go on."""
        needed = required_scope(method, path)
        return needed if needed is not None and needed not in self.scopes else None

    def forbidden_message(self, scope: str) -> str:
        has = ", ".join(self.scopes) or "none"
        return f"this {self.credential} lacks the '{scope}' scope (its scopes: {has})"


@dataclass(frozen=True)
class Credentials:
    api_key: str | None
    access_token: str | None
    unread_authorization: bool = False  # an Authorization header we found no key in, for messages

    @classmethod
    def from_headers(cls, headers: Headers) -> Credentials:
        """A key from `X-API-Key`, `Authorization: Bearer KEY`, `Authorization: Basic` (the key is
        the password: Label Studio can send nothing else) or `Token: KEY` (X-AnyLabeling's)."""
        authorization = headers.get("authorization", "")
        from_authorization = _authorization_key(authorization)
        key = headers.get("x-api-key") or from_authorization or headers.get("token", "").strip()
        unread = bool(authorization.strip()) and from_authorization is None
        return cls(key or None, headers.get("cf-access-jwt-assertion") or None, unread)

    def with_key(self, key: str | None) -> Credentials:
        if self.api_key is not None or not key:
            return self
        return Credentials(key, self.access_token, self.unread_authorization)


def _authorization_key(value: str) -> str | None:
    scheme, _, credentials = value.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None  # user:password; any user name
    return None


class Authenticator:
    """Applies the `auth` policy, decided at start. In `auto`, keys are on when something is at
    the keys file's path at start, or as soon as something appears there; never off again."""

    def __init__(self, settings: Settings) -> None:
        self.configured = settings.auth
        self.keys = KeyStore(settings.keys_file)
        self.access_scopes = parse_scopes(settings.access_scopes)
        self.access = (
            AccessVerifier(
                settings.access_team_domain,
                settings.access_aud,
                settings.access_certs_url,
                refresh_cooldown_s=settings.access_jwks_cooldown_s,
                lifespan_s=settings.access_jwks_lifespan_s,
            )
            if settings.access_configured
            else None
        )
        self.keys_on = self.configured in ("keys", "either", "both") or (
            self.configured == "auto" and self.keys.present()
        )
        self.policy = self._settled_policy()
        log.info("authentication: %s", self.policy)
        if self.keys_on:
            self.keys.problem()  # read now, so a broken file is logged at start

    def _settled_policy(self) -> str:
        if self.configured != "auto":
            return self.configured
        if self.keys_on:
            return "either" if self.access is not None else "keys"
        return "access" if self.access is not None else "none"

    def effective_policy(self) -> str:
        if not self.keys_on and self.configured == "auto" and self.keys.present():
            # Fail closed: a keys file created while serving turns keys on at once.
            self.keys_on = True
            self.policy = self._settled_policy()
            log.warning("keys file %s appeared: API keys are required from now on", self.keys.path)
        return self.policy

    def report(self) -> dict[str, Any]:
        """How callers are checked, for authenticated readiness probes (paths included)."""
        keys = {"path": str(self.keys.path), "problem": self.keys.problem()} if self.keys_on else None
        return {"policy": self.effective_policy(), "keys_file": keys}

    async def identify(self, credentials: Credentials) -> Caller | None:
        """The caller's name when they sent valid credentials; None otherwise (never refuses)."""
        if credentials.api_key is None and credentials.access_token is None:
            return None
        try:
            return await self.authenticate(credentials)
        except Unauthorized:
            return None

    async def authenticate(self, credentials: Credentials) -> Caller | None:
        """Who is calling; None when no auth is configured."""
        policy = self.effective_policy()
        if policy == "none":
            return None
        via_key = self._check_key(credentials.api_key) if policy != "access" else None
        via_access = await self._check_access(credentials.access_token) if policy != "keys" else None
        if policy == "both":
            if via_key is None or via_access is None:
                raise Unauthorized("this server needs both an API key and a Cloudflare Access login")
            return via_key
        caller = via_key or via_access
        if caller is None:
            raise Unauthorized(_missing_message(policy, credentials))
        return caller

    def _check_key(self, key: str | None) -> Caller | None:
        if key is None:
            return None
        stored = self.keys.match(key)
        if stored is None:
            raise Unauthorized("invalid API key")
        # The owner names this key, not just its name: a key made later under a revoked key's
        # name must not see that key's jobs and images.
        name = stored.name
        return Caller(f"key:{name}", f"key:{name}#{key_fingerprint(key)}", stored.scopes, "key")

    async def _check_access(self, token: str | None) -> Caller | None:
        if token is None or self.access is None:
            return None
        try:
            identity = await asyncio.to_thread(self.access.verify, token)
        except AccessDenied as exc:
            raise Unauthorized(str(exc)) from None
        who = f"access:{identity.subject}"
        return Caller(who, who, self.access_scopes, "Cloudflare Access login")


def remember(state: dict[str, Any], caller: Caller | None) -> None:
    """For the routes and the access log: who (None: anonymous) and whose resources."""
    state["principal"] = caller.principal if caller else None
    state["owner"] = caller.owner if caller else None


def key_fingerprint(key: str) -> str:
    """A short, stable id of one key (a prefix of the hash stored for it; never the key)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _missing_message(policy: str, credentials: Credentials) -> str:
    if policy == "access":
        return "a Cloudflare Access login is required (no Cf-Access-Jwt-Assertion header)"
    how = "send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
    if credentials.unread_authorization:
        return f"the Authorization header holds no key this server reads: {how}"
    return f"an API key is required: {how}"


class GuardMiddleware(HttpMiddleware):
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        super().__init__(app)
        self.public = (
            ALWAYS_PUBLIC
            | (DOCS if settings.public_docs else frozenset())
            | ({"/metrics"} if settings.public_metrics else frozenset())
        )
        self.trusted = parse_networks(settings.trusted_proxy_list)
        self.auth = Authenticator(settings)
        self.max_body_bytes = settings.max_body_bytes
        rate = settings.rate_limit_per_minute / 60
        self.rate = RateLimiter(rate, settings.rate_limit_burst) if rate > 0 else None
        self.inflight = (
            InflightLimiter(settings.max_inflight_per_client) if settings.max_inflight_per_client else None
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        state = scope.setdefault("state", {})
        peer = scope["client"][0] if scope.get("client") else None
        state["client"] = client_address(peer, headers, self.trusted)
        if scope["path"] in self.public:
            if scope["path"] in OPTIONAL_AUTH:
                await self._identify(state, headers)
            await self.app(scope, receive, send)
            return
        credentials = Credentials.from_headers(headers)
        roboflow_shaped = KEY_IN_BODY.fullmatch(scope["path"]) is not None
        state["message_on_top"] = roboflow_shaped  # its clients read errors' `message` there
        try:
            if credentials.api_key is None and roboflow_shaped:
                credentials = credentials.with_key(QueryParams(scope["query_string"]).get("api_key"))
                if credentials.api_key is None and self.auth.effective_policy() != "none":
                    body, key = await self._key_in_body(scope, receive)
                    receive = _replaying(body, receive)
                    credentials = credentials.with_key(key)
            caller = await self.auth.authenticate(credentials)
        except Unauthorized as exc:
            await send_error(scope, send, exc, {"WWW-Authenticate": WWW_AUTHENTICATE})
            return
        except (PayloadTooLarge, MalformedInput) as exc:  # the body that was to hold the key
            await send_error(scope, send, exc)
            return
        remember(state, caller)
        # No caller: no authentication is configured (loopback), so every scope is allowed.
        if caller is not None and (lacking := caller.lacking(scope["method"], scope["path"])):
            await send_error(scope, send, Forbidden(caller.forbidden_message(lacking)))
            return
        await self._limited(scope, receive, send, state["principal"] or f"ip:{state['client']}")

    async def _key_in_body(self, scope: Scope, receive: Receive) -> tuple[bytes, str | None]:
        """The body (kept for the route, parsed once: `state.json_body`) and its `api_key`."""
        body = await _read_body(receive, self.max_body_bytes)
        if b'"api_key"' not in body:
            return body, None
        try:  # the one JSON reader, with its limits; a body it refuses holds no key
            data = await run_in_threadpool(load_json, body, "the JSON body", "body is not valid JSON")
        except TunnelvisionError:
            return body, None
        key = data.get("api_key") if isinstance(data, dict) else None
        if isinstance(data, dict):
            scope["state"]["json_body"] = data
        return body, key if isinstance(key, str) else None

    async def _identify(self, state: dict[str, Any], headers: Headers) -> None:
        remember(state, await self.auth.identify(Credentials.from_headers(headers)))
        if state["principal"] is not None:
            state["auth_report"] = self.auth.report()

    async def _limited(self, scope: Scope, receive: Receive, send: Send, client: str) -> None:
        wait_s = self.rate.acquire(client) if self.rate else 0.0
        if wait_s > 0:
            await send_error(scope, send, RateLimited("too many requests; slow down", wait_s))
            return
        if self.inflight is None:
            await self.app(scope, receive, send)
            return
        if not self.inflight.try_enter(client):
            message = f"at most {self.inflight.cap} requests of one client may wait at once"
            await send_error(scope, send, TooManyInFlight(message, 1.0))
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight.leave(client)


async def _read_body(receive: Receive, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise MalformedInput("the client left before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body is over the {max_bytes} byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then waits for the disconnect."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
