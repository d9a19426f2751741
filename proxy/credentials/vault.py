"""HashiCorp Vault: KV version 2 reads, with token, AppRole or Kubernetes
service-account login (https://developer.hashicorp.com/vault/api-docs).

``vault:secret/data/openai#api_key`` is ``GET /v1/secret/data/openai`` and
the field ``api_key`` of ``.data.data``. Vault's own token goes only in the
``X-Vault-Token`` header to the configured address; it is never logged.
A login's token is reused until its lease ends or Vault answers 403 (a
revoked token), then the login is done again, once per read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from proxy.credentials.http import StoreClient
from proxy.credentials.model import Credential, SourceError
from proxy.netguard import Guard
from proxy.policy import SecretRef
from proxy.policy.credential_model import StaticRef, VaultStore
from proxy.secrets import read_secret

RENEW_MARGIN = 30.0  # log in again this long before the token's lease ends


def read_static(ref: StaticRef) -> str:
    """A store's own secret (its token, secret_id, JWT). Blocking for file:
    (a projected service-account token rotates, so it is read per login)."""
    value, problem = read_secret(SecretRef(ref.kind, ref.ref))
    if value is None:
        raise SourceError(f"{ref.source} {problem}")
    return value


class VaultClient:
    def __init__(self, store: VaultStore, guard: Guard, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.http = StoreClient(store.ca_bundle, guard)
        self.clock = clock
        self._token: str | None = None
        self._token_until = 0.0
        self._login_lock = asyncio.Lock()
        self.logins = 0

    def _headers(self, token: str | None) -> dict[str, str]:
        headers = {"X-Vault-Request": "true"}
        if token is not None:
            headers["X-Vault-Token"] = token
        if self.store.namespace:
            headers["X-Vault-Namespace"] = self.store.namespace
        return headers

    async def token(self, *, renew: bool = False) -> str:
        auth = self.store.auth
        if auth.method == "token":
            assert auth.token is not None, "the loader requires it"
            return await asyncio.to_thread(read_static, auth.token)
        async with self._login_lock:  # one login at a time, the others reuse it
            if self._token is not None and not renew and self.clock() < self._token_until:
                return self._token
            self._token = None
            if auth.method == "approle":
                assert auth.secret_id is not None
                body = {"role_id": auth.role_id, "secret_id": await asyncio.to_thread(read_static, auth.secret_id)}
            else:
                assert auth.jwt is not None
                body = {"role": auth.role, "jwt": await asyncio.to_thread(read_static, auth.jwt)}
            url = f"{self.store.address}/v1/auth/{auth.mount}/login"
            status, data = await self.http.request("POST", url, json=body, headers=self._headers(None))
            self.logins += 1
            token = _dig(data, "auth", "client_token")
            if status != 200 or not isinstance(token, str) or not token:
                raise SourceError(f"vault {auth.method} login failed (HTTP {status})")
            lease = _dig(data, "auth", "lease_duration")
            lease = float(lease) if isinstance(lease, int | float) and lease > 0 else float("inf")
            self._token, self._token_until = token, self.clock() + max(lease - RENEW_MARGIN, lease / 2)
            return token

    async def read(self, path: str, field: str) -> Credential:
        url = f"{self.store.address}/v1/{path}"
        status, data = await self.http.request("GET", url, headers=self._headers(await self.token()))
        if status == 403 and self.store.auth.method != "token":  # the login's token was revoked or expired
            status, data = await self.http.request("GET", url, headers=self._headers(await self.token(renew=True)))
        if status != 200:
            raise SourceError(f"vault read failed (HTTP {status})")
        fields = _dig(data, "data", "data")
        if not isinstance(fields, dict):
            raise SourceError("vault answer is not a KV version 2 secret (no data.data)")
        value = fields.get(field)
        if not isinstance(value, str) or not value:
            raise SourceError("vault secret has no such field, or it is not a string")
        return Credential(value)

    async def close(self) -> None:
        await self.http.close()


class VaultSource:
    def __init__(self, client: VaultClient, ref: SecretRef) -> None:
        self.client, self.ref, self.source = client, ref, ref.source

    async def fetch(self) -> Credential:
        return await self.client.read(self.ref.ref, self.ref.key)


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data
