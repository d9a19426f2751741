"""OAuth 2.0 access tokens for ``auth: {type: oauth2}`` (RFC 6749).

client_credentials (section 4.4) or refresh_token (section 6) grant. The
client authenticates with HTTP Basic (``client_secret_basic``, section 2.3.1:
id and secret form-urlencoded, then base64) or in the form body
(``client_secret_post``). The token endpoint is reached through
``StoreClient``: verified TLS, the metadata-address guard.

A provider may rotate the refresh token in its answer (section 6: "The
authorization server MAY issue a new refresh token"); the newest one is
kept in memory and used for the next refresh.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote_plus

from proxy.credentials.http import StoreClient
from proxy.credentials.model import Credential, SourceError, error_word
from proxy.netguard import Guard
from proxy.policy import SecretRef
from proxy.policy.credential_model import OAuth2

DEFAULT_EXPIRES_IN = 3600.0  # RFC 6749 5.1: expires_in is RECOMMENDED, not required

Lookup = Callable[[SecretRef], Awaitable[str | None]]


def token_request(
    cfg: OAuth2, client_secret: str | None, refresh_token: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """The form and headers of one token request (pure, table-tested)."""
    form: dict[str, str] = {"grant_type": cfg.grant}
    if cfg.grant == "refresh_token":
        form["refresh_token"] = refresh_token or ""
    if cfg.scope:
        form["scope"] = cfg.scope
    if cfg.audience:
        form["audience"] = cfg.audience
    headers = {"Accept": "application/json"}
    if client_secret is None:  # a public client names itself only
        form["client_id"] = cfg.client_id
    elif cfg.auth_method == "post":
        form["client_id"], form["client_secret"] = cfg.client_id, client_secret
    else:
        pair = f"{quote_plus(cfg.client_id, safe='')}:{quote_plus(client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return form, headers


class OAuth2Source:
    def __init__(self, provider: str, cfg: OAuth2, lookup: Lookup, guard: Guard, ca_bundle: str | None,
                 *, clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.cfg = cfg
        self.source = f"oauth2:{provider}"
        self.lookup = lookup
        self.http = StoreClient(cfg.ca_bundle or ca_bundle, guard)
        self.clock = clock
        self._rotated_refresh: str | None = None  # a refresh token the endpoint issued in place of ours
        self.requests = 0

    async def _ref(self, ref: SecretRef | None, what: str) -> str | None:
        if ref is None:
            return None
        value = await self.lookup(ref)
        if value is None:
            raise SourceError(f"its {what} ({ref.source}) is not available")
        return value

    async def fetch(self) -> Credential:
        cfg = self.cfg
        secret = await self._ref(cfg.client_secret, "client_secret")
        refresh = self._rotated_refresh or await self._ref(cfg.refresh_token, "refresh_token")
        form, headers = token_request(cfg, secret, refresh)
        self.requests += 1
        started = self.clock()
        status, data = await self.http.request("POST", cfg.token_url, data=form, headers=headers)
        if status != 200 or not isinstance(data, dict):
            code = error_word(data.get("error") if isinstance(data, dict) else None, f"HTTP {status}")
            raise SourceError(f"token request failed ({code})")  # RFC 6749 5.2 codes are fixed words
        token, kind = data.get("access_token"), data.get("token_type", "bearer")
        if not isinstance(token, str) or not token or not isinstance(kind, str) or kind.lower() != "bearer":
            raise SourceError("token answer has no bearer access_token")
        expires_in = data.get("expires_in", DEFAULT_EXPIRES_IN)
        try:
            lifetime = float(expires_in)
        except (TypeError, ValueError):
            lifetime = DEFAULT_EXPIRES_IN
        rotated = data.get("refresh_token")
        if cfg.grant == "refresh_token" and isinstance(rotated, str) and rotated:
            self._rotated_refresh = rotated
        # Counted from when the request was sent: the token's clock started no earlier.
        return Credential(token, started + max(lifetime, 0.0))

    async def close(self) -> None:
        await self.http.close()
