"""Fake secret stores over TLS, each implementing the documented HTTP API
of the real one (paths, JSON shapes, headers), so sidekey's clients and the
vendors' own SDKs (hvac, azure-keyvault-secrets) can both be pointed at them.

- ``FakeVault``: KV version 2 read (``GET /v1/{mount}/data/{path}``), AppRole
  and Kubernetes login (``POST /v1/auth/{mount}/login``), ``X-Vault-Token``
  (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2,
  .../auth/approle, .../auth/kubernetes).
- ``FakeAzureKeyVault``: ``GET /secrets/{name}[/{version}]`` with the
  bearer challenge Key Vault answers first, and the App Service managed
  identity token endpoint (``IDENTITY_ENDPOINT`` + ``X-IDENTITY-HEADER``).
- ``FakeTokenEndpoint``: an OAuth 2.0 token endpoint (RFC 6749 4.4, 6).

Each runs on its own loop in a daemon thread (``StoreThread``); tests change
its plain state (dicts, counters) from their own thread. ``pause()`` closes
the listener (connections refused) and ``resume()`` opens it again on the
same port: a store that went away and came back.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs

import trustme
from aiohttp import web


class StoreThread:
    """An aiohttp app over TLS (its own trustme CA) on a loop in a thread."""

    def __init__(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="fake-store-"))
        self.ca = trustme.CA()
        self.ca_pem_path = self._tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem_path))
        self._cert = self.ca.issue_cert("localhost", "127.0.0.1")
        self.port = 0
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=type(self).__name__, daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(ctx)
        return ctx

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _start(self) -> None:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests.append((request.method, request.path))
            return await handler(request)  # type: ignore[no-any-return]

        app = web.Application(middlewares=[record])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl(), reuse_address=True)
        await self._site.start()
        self.port = int(self._runner.addresses[-1][1])

    async def _pause(self) -> None:
        assert self._site is not None and self._runner is not None
        await self._site.stop()
        server = self._runner.server
        for handler in list(server.connections if server is not None else []):
            if handler.transport is not None:
                handler.transport.abort()  # kept-alive connections too: the store is gone

    def pause(self) -> None:
        self._run(self._pause())

    def resume(self) -> None:
        self._run(self._listen())

    def __enter__(self) -> Self:
        self._thread.start()
        self._run(self._start())
        return self

    async def _close(self) -> None:
        assert self._runner is not None
        server = self._runner.server
        transports = [h.transport for h in (server.connections if server is not None else []) if h.transport]
        await self._runner.cleanup()
        for transport in transports:  # idle TLS peers never answer close_notify
            transport.abort()
        await asyncio.sleep(0)

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


def _vault_error(status: int, *messages: str) -> web.Response:
    return web.json_response({"errors": list(messages)}, status=status)


class FakeVault(StoreThread):
    """State: ``kv[(mount, path)] = {field: value}``; ``approles[role_id] =
    secret_id``; ``k8s_roles[role] = jwt``; ``tokens`` valid client tokens."""

    def __init__(self, *, lease_duration: int = 3600) -> None:
        super().__init__()
        self.kv: dict[tuple[str, str], dict[str, str]] = {}
        self.versions: dict[tuple[str, str], int] = {}
        self.approles: dict[str, str] = {}
        self.k8s_roles: dict[str, str] = {}
        self.root_token = "hvs." + secrets.token_urlsafe(24)
        self.tokens: set[str] = {self.root_token}
        self.lease_duration = lease_duration
        self.logins = 0
        self.reads = 0

    def put(self, mount: str, path: str, data: dict[str, str]) -> None:
        self.kv[(mount, path)] = dict(data)
        self.versions[(mount, path)] = self.versions.get((mount, path), 0) + 1

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/auth/token/lookup-self", self._lookup_self)
        app.router.add_post("/v1/auth/{mount}/login", self._login)
        app.router.add_get("/v1/{mount}/data/{path:.+}", self._read)

    async def _login(self, request: web.Request) -> web.Response:
        mount = request.match_info["mount"]
        try:
            body = await request.json()
        except ValueError:
            return _vault_error(400, "failed to parse JSON input")
        if mount == "approle":
            ok = self.approles.get(body.get("role_id")) == body.get("secret_id") is not None
            meta = {"role_name": "sidekey"}
        elif mount == "kubernetes":
            ok = self.k8s_roles.get(body.get("role")) == body.get("jwt") is not None
            meta = {"role": body.get("role"), "service_account_name": "sidekey", "service_account_namespace": "default"}
        else:
            return _vault_error(404, "no handler for route")
        if not ok:
            return _vault_error(400, "invalid credentials" if mount == "approle" else "permission denied")
        self.logins += 1
        token = "hvs." + secrets.token_urlsafe(24)
        self.tokens.add(token)
        return web.json_response({
            "request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
            "data": None, "wrap_info": None, "warnings": None,
            "auth": {"client_token": token, "accessor": secrets.token_urlsafe(12), "policies": ["default", "sidekey"],
                     "token_policies": ["default", "sidekey"], "metadata": meta,
                     "lease_duration": self.lease_duration, "renewable": True, "entity_id": str(uuid.uuid4()),
                     "token_type": "service", "orphan": True},
        })  # fmt: skip

    async def _lookup_self(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Vault-Token") not in self.tokens:
            return _vault_error(403, "permission denied")
        return web.json_response({"data": {"policies": ["default", "sidekey"], "ttl": self.lease_duration,
                                           "renewable": True, "type": "service"}})  # fmt: skip

    async def _read(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Vault-Token") not in self.tokens:
            return _vault_error(403, "permission denied")
        key = (request.match_info["mount"], request.match_info["path"])
        if key not in self.kv:
            return _vault_error(404)
        self.reads += 1
        return web.json_response({
            "request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
            "data": {"data": self.kv[key], "metadata": {
                "created_time": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()), "custom_metadata": None,
                "deletion_time": "", "destroyed": False, "version": self.versions[key]}},
            "wrap_info": None, "warnings": None, "auth": None,
        })  # fmt: skip

    def store_yaml(self, auth: str, *extra: str) -> str:
        """The policy's ``vault:`` entry under ``secret_stores:`` for this fake (2-space
        indented, one line per setting); ``extra`` lines (``ttl: 1s``) go under it."""
        lines = [f"address: {self.url}", f"ca_bundle: {self.ca_pem_path}", f"auth: {auth}", *extra]
        return "  vault:\n" + "".join(f"    {line}\n" for line in lines)


class FakeAzureKeyVault(StoreThread):
    """Key Vault's ``GET /secrets/{name}[/{version}]`` (API 7.x) behind its
    bearer challenge, and the App Service managed identity endpoint at
    ``/msi/token`` that azure-identity's default chain finds through
    ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` (``identity_env``).

    Key Vault's challenge names a resource whose domain the vault's host
    ends with (``vault.azure.net`` for ``NAME.vault.azure.net``), and the
    SDK checks that. The vault here is ``127.0.0.1``, so the resource named
    is ``0.0.1``: the check runs as it does against Azure, unmodified."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[str, list[tuple[str, str]]] = {}  # name -> [(version, value)], newest last
        self.identity_header = secrets.token_hex(16)
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.reads = 0

    @property
    def vault_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def identity_env(self) -> dict[str, str]:
        return {"IDENTITY_ENDPOINT": f"{self.vault_url}/msi/token", "IDENTITY_HEADER": self.identity_header}

    def put(self, name: str, value: str) -> str:
        version = uuid.uuid4().hex
        self.secrets.setdefault(name, []).append((version, value))
        return version

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/msi/token", self._msi_token)
        app.router.add_get("/secrets/{name}", self._secret)
        app.router.add_get("/secrets/{name}/", self._secret)  # the SDK asks for the latest as NAME/ + empty version
        app.router.add_get("/secrets/{name}/{version}", self._secret)

    def _resource(self) -> str:
        return f"https://0.0.1:{self.port}"

    async def _msi_token(self, request: web.Request) -> web.Response:
        if request.headers.get("X-IDENTITY-HEADER") != self.identity_header:
            return web.json_response({"error": "invalid_request"}, status=400)
        if request.query.get("api-version") != "2019-08-01" or not request.query.get("resource"):
            return web.json_response({"error": "invalid_request"}, status=400)
        self.token_requests += 1
        token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.MI-" + secrets.token_urlsafe(16)
        self.tokens.add(token)
        return web.json_response({"access_token": token, "expires_on": str(int(time.time()) + 3600),
                                  "resource": request.query["resource"], "token_type": "Bearer",
                                  "client_id": str(uuid.uuid4())})  # fmt: skip

    async def _secret(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            challenge = f'Bearer authorization="https://login.microsoftonline.com/{uuid.UUID(int=7)}", resource="{self._resource()}"'
            return web.json_response({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}},
                                     status=401, headers={"WWW-Authenticate": challenge})  # fmt: skip
        name, version = request.match_info["name"], request.match_info.get("version")
        versions = self.secrets.get(name, [])
        found = [v for v in versions if v[0] == version] if version else versions[-1:]
        if not found:
            return web.json_response({"error": {"code": "SecretNotFound", "message": f"A secret with (name/id) {name} was not found in this key vault."}},
                                     status=404)  # fmt: skip
        self.reads += 1
        ver, value = found[0]
        now = int(time.time())
        return web.json_response({
            "value": value, "id": f"{self.vault_url}/secrets/{name}/{ver}",
            "attributes": {"enabled": True, "created": now, "updated": now, "recoveryLevel": "Recoverable+Purgeable",
                           "recoverableDays": 90},
            "tags": {},
        })  # fmt: skip


class MotoTLSServer:
    """moto's server (the AWS APIs it implements, over their real HTTP
    wire) behind TLS with its own trustme CA, as ``moto_server`` runs it."""

    def __init__(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="fake-aws-"))
        ca = trustme.CA()
        self.ca_pem_path = self._tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_pem_path))
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self._cert, self._key = self._tmp / "cert.pem", self._tmp / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(self._cert))
        cert.private_key_pem.write_to_path(str(self._key))
        self.port = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def __enter__(self) -> MotoTLSServer:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler  # type: ignore[attr-defined]  # not re-exported
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self._cert), str(self._key))
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler,
                                   ssl_context=ctx)  # fmt: skip
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=30)
        shutil.rmtree(self._tmp, ignore_errors=True)


class FakeTokenEndpoint(StoreThread):
    """An OAuth 2.0 token endpoint at ``/oauth/token``: client_credentials
    with client_secret_basic or client_secret_post, and refresh_token
    (rotating the refresh token when ``rotate`` is set)."""

    def __init__(self, client_id: str, client_secret: str, *, expires_in: int = 3600) -> None:
        super().__init__()
        self.client_id, self.client_secret = client_id, client_secret
        self.expires_in = expires_in
        self.refresh_tokens: set[str] = set()
        self.rotate = False
        self.issued: list[str] = []
        self.forms: list[dict[str, str]] = []
        self.fail = False  # answer 503 (the endpoint is up but failing)
        self.delay = 0.0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/oauth/token", self._token)

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    def _client_ok(self, request: web.Request, form: dict[str, str]) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        else:
            cid, secret = form.get("client_id", ""), form.get("client_secret", "")
        return cid == self.client_id and secret == self.client_secret

    async def _token(self, request: web.Request) -> web.Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        form = {k: v[0] for k, v in parse_qs(await request.text()).items()}
        self.forms.append(form)
        if self.fail:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 5.1
        grant = form.get("grant_type")
        if grant == "refresh_token":
            if form.get("refresh_token") not in self.refresh_tokens:
                return web.json_response({"error": "invalid_grant"}, status=400, headers=headers)
        elif grant != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400, headers=headers)
        if not self._client_ok(request, form):
            return web.json_response({"error": "invalid_client"}, status=401, headers=headers)
        token = "at-" + secrets.token_urlsafe(24)
        self.issued.append(token)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}
        if grant == "refresh_token" and self.rotate:
            self.refresh_tokens.discard(form["refresh_token"])
            new = "rt-" + secrets.token_urlsafe(24)
            self.refresh_tokens.add(new)
            body["refresh_token"] = new
        return web.json_response(body, headers=headers)
