"""Cloudflare Access: verify the `Cf-Access-Jwt-Assertion` the edge adds after a login.

RS256 only (so `alg: none` and HS256 tokens signed with a public key are refused), keys from the
team's certs URL, and `iss`, `aud` and `exp` required and checked.

The key set is trusted for `lifespan_s`, then fetched again, so a key the team removed stops
working within that time; a token naming an unknown `kid` (keys rotate every six weeks) triggers
at most one early refetch per `refresh_cooldown_s`. No key is cached by `kid` on its own: such a
cache never forgets a removed key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt


class AccessDenied(Exception):
    """The token is missing, malformed, expired or not for this application."""


@dataclass(frozen=True)
class AccessIdentity:
    subject: str  # the user's email, or the service token's common name


class AccessVerifier:
    def __init__(
        self,
        team_domain: str,
        audience: str,
        certs_url: str = "",
        refresh_cooldown_s: float = 30.0,
        lifespan_s: float = 300.0,
    ) -> None:
        team = team_domain.removeprefix("https://").rstrip("/")
        if "." not in team:
            team = f"{team}.cloudflareaccess.com"
        self.issuer = f"https://{team}"
        self.audience = audience
        self.certs_url = certs_url or f"{self.issuer}/cdn-cgi/access/certs"
        self._jwks = jwt.PyJWKClient(
            self.certs_url,
            cache_keys=False,
            cache_jwk_set=True,
            lifespan=lifespan_s,
            timeout=5,
            cooldown_duration=refresh_cooldown_s,  # PyJWT >= 2.14
        )

    def verify(self, token: str) -> AccessIdentity:
        """Blocking (may fetch the certs): call it from a thread."""
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != "RS256":
                raise AccessDenied("Access token must be signed with RS256")
            key = self._jwks.get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AccessDenied("Access token has expired") from None
        except jwt.InvalidAudienceError:
            raise AccessDenied("Access token is for another application (aud)") from None
        except jwt.InvalidIssuerError:
            raise AccessDenied("Access token is from another team (iss)") from None
        except jwt.PyJWKClientConnectionError:
            raise AccessDenied("cannot fetch the Access signing keys; try again") from None
        except jwt.PyJWKClientError:
            raise AccessDenied("Access token signed by an unknown key") from None
        except jwt.PyJWTError:
            raise AccessDenied("Access token is invalid") from None
        subject = claims.get("email") or claims.get("common_name") or claims.get("sub") or "access"
        return AccessIdentity(str(subject))
