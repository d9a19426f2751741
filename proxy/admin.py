"""The admin listener: health, readiness, metrics, providers, policy, reload, usage.

It has its own socket (default 127.0.0.1:9090) and is never reachable through
the proxy listener. Bound to a non-loopback address it requires a bearer
token; without one it refuses to start. Inside a Kubernetes pod every
container shares the loopback, so there (``require_token``) it requires the
token on loopback too. Secrets appear only as their source
(``env:OPENAI_API_KEY``), never as values.

The metrics listener (``AdminServer.metrics_only``) is the same server with
only the read-only routes a scraper and the kubelet's probes need, and no
token: it may bind the pod's address.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.capabilities import CACHE_ADMIN, METRICS, USAGE_REPORT
from proxy.policy import SCHEMA_VERSION, Policy, Provider, Target
from proxy.policy.load import PolicyError

if TYPE_CHECKING:
    from proxy.server import Sidekey


# Documented in docs/admin-openapi.yaml; a test keeps the two in step.
ROUTES = (
    ("GET", "/healthz", "healthz"),
    ("GET", "/readyz", "readyz"),
    ("GET", "/metrics", "prometheus"),
    ("GET", "/providers", "providers"),
    ("GET", "/policy", "policy"),
    ("POST", "/policy/reload", "reload"),
    ("GET", "/usage", "usage"),
    ("POST", "/credentials/refresh", "refresh_credentials"),
    ("GET", "/cache/stats", "cache_stats"),
    ("DELETE", "/cache", "cache_delete"),
)
# What the metrics listener serves: nothing that changes state or shows the policy.
PUBLIC_ROUTES = tuple(r for r in ROUTES if r[1] in ("/healthz", "/readyz", "/metrics"))


class AdminConfigError(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def provider_view(p: Provider, secret_available: bool | None) -> dict[str, Any]:
    up = p.upstream
    return {
        "name": p.name,
        "hosts": list(p.hosts),
        "upstream": f"https://{up.host}:{up.port}{up.path_prefix}" if up else "https://<connect target>",
        "auth": {"type": p.auth.type, "secret": p.auth.secret.source if p.auth.secret else None},
        "secret_available": secret_available,
        "timeouts": {"connect": p.timeouts.connect, "read": p.timeouts.read},
        "pool": {"max_connections": p.pool.max_connections, "keepalive_timeout": p.pool.keepalive_timeout},
        "group": {
            "balance": p.balance,
            "members": [_member(p, t) for t in p.targets],
            "fallbacks": [fb.provider for fb in p.fallbacks],
            "health_check": {
                "method": p.health_check.method,
                "path": p.health_check.path,
                "interval": p.health_check.interval,
            }
            if p.health_check
            else None,
        },
    }


def _member(p: Provider, t: Target) -> dict[str, Any]:
    up = t.upstream or p.upstream
    ref = p.secret_of(t)
    return {
        "name": t.name,
        "url": f"https://{up.host}:{up.port}{up.path_prefix}" if up else "https://<connect target>",
        "secret": ref.source if ref else None,
        "weight": t.weight,
        "priority": t.priority,
    }


def upstream_views(engine: Sidekey, p: Provider) -> list[dict[str, Any]]:
    """Each member with its health, circuit and load (see ``Groups.known``)."""
    out = []
    for state in engine.groups.known(p):
        ref = p.secret_of(state.target)
        out.append({**state.statistics(), "secret": ref.source if ref else None})
    return out


def policy_view(policy: Policy) -> dict[str, Any]:
    """The active policy with every secret shown as its source only."""
    lim = policy.limits
    return {
        "digest": policy.digest,
        "schema_version": SCHEMA_VERSION,
        "version": policy.digest,  # the digest under its first name, kept for existing readers
        "source": policy.source,
        "unmatched": policy.unmatched,
        "limits": {f: getattr(lim, f) for f in lim.__dataclass_fields__},
        "network": {"allow": [str(n) for n in policy.allow_networks]},
        "addons": list(policy.addons),
        "providers": [provider_view(p, None) for p in policy.providers],
    }


class AdminServer:
    def __init__(
        self, engine: Sidekey, *, host: str = "127.0.0.1", port: int = 9090,
        token: str | None = None, require_token: bool = False, routes: tuple[tuple[str, str, str], ...] = ROUTES,
    ) -> None:  # fmt: skip
        if routes is not PUBLIC_ROUTES and not token:
            if require_token:
                raise AdminConfigError(
                    "inside a pod the admin API requires a token even on loopback (the app containers share it)"
                )
            if not is_loopback(host):
                raise AdminConfigError("the admin listener binds a non-loopback address only with an admin token")
        self.engine, self.host, self.port, self._token = engine, host, port, token
        self.metrics = engine.addons.capability(METRICS)
        self.loaded_at = time.time()
        self._runner: web.AppRunner | None = None
        app = web.Application(middlewares=[self._auth] if token else [])
        for method, path, handler in routes:
            app.router.add_route(method, path, getattr(self, handler))
        self.app = app

    @classmethod
    def metrics_only(cls, engine: Sidekey, *, host: str, port: int) -> AdminServer:
        """``/metrics``, ``/healthz`` and ``/readyz`` without a token, for Prometheus
        and the kubelet on the pod's address."""
        return cls(engine, host=host, port=port, routes=PUBLIC_ROUTES)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            return web.json_response({"error": {"code": "unauthorized"}}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def start(self) -> tuple[str, int]:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:  # the port is taken (or not ours): leave nothing half-open
            await self._runner.cleanup()
            self._runner = None
            raise
        server = site._server  # noqa: SLF001 - the bound port when asked for port 0
        sock = server.sockets[0].getsockname() if server is not None else (self.host, self.port)  # type: ignore[attr-defined]
        self.port = sock[1]
        self.engine.protect_port(self.port)
        return self.host, self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers ----------------------------------------------------------
    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        server = self.engine.server
        ready = server is not None and server.is_serving() and not self.engine.draining
        return web.json_response({"ready": ready, "policy": self.engine.policy.digest}, status=200 if ready else 503)

    async def prometheus(self, _request: web.Request) -> web.Response:
        if self.metrics is None:
            return web.json_response({"error": {"code": "metrics_disabled"}}, status=404)
        body = self.metrics.exposition()
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def providers(self, _request: web.Request) -> web.Response:
        engine = self.engine
        views = []
        for p in engine.policy.providers:
            view = provider_view(p, engine.secret_available(p))
            view["upstreams"] = upstream_views(engine, p)
            view["credentials"] = engine.secrets.credential_views(p) if engine.secrets is not None else []
            views.append(view)
        return web.json_response({"providers": views, "pools": engine.pools.statistics()})

    async def policy(self, _request: web.Request) -> web.Response:
        return web.json_response({**policy_view(self.engine.policy), "loaded_at": self.engine.policy_loaded_at})

    async def usage(self, request: web.Request) -> web.Response:
        """Requests, tokens and cost counted so far (every sidecar's when Redis backs the ledger)."""
        usage = self.engine.addons.capability(USAGE_REPORT)
        if usage is None:
            return web.json_response({"error": {"code": "usage_disabled"}}, status=404)
        try:
            report = usage.usage_report(request.query.get("provider") or None, request.query.get("since"))
        except ValueError:  # never quote the value back
            reason = "since: expected YYYY-MM-DD, an RFC 3339 time with an offset, or unix seconds"
            return web.json_response({"error": {"code": "bad_request", "message": reason}}, status=400)
        return web.json_response(report)

    async def refresh_credentials(self, request: web.Request) -> web.Response:
        """Re-read credentials now (``?provider=NAME``: that provider's only):
        after rotating a secret, without waiting for its ttl."""
        secrets = self.engine.secrets
        if secrets is None:
            return web.json_response({"error": {"code": "credentials_disabled"}}, status=404)
        name = request.query.get("provider")
        provider = self.engine.policy.provider(name) if name else None
        if name and provider is None:  # never quote the value back
            body = {"error": {"code": "not_found", "message": "no provider of that name"}}
            return web.json_response(body, status=404)
        return web.json_response({"refreshed": await secrets.refresh_credentials(provider)})

    async def cache_stats(self, _request: web.Request) -> web.Response:
        """Per provider with a ``cache:``: entries, bytes, results, hit ratio, evictions."""
        cache = self.engine.addons.capability(CACHE_ADMIN)
        report = await cache.report() if cache is not None else {"providers": {}, "in_flight": 0}
        return web.json_response(report)

    async def cache_delete(self, request: web.Request) -> web.Response:
        """``?provider=NAME&pattern=/v1/chat/*``: entries whose path matches the glob."""
        provider = request.query.get("provider") or None
        pattern = request.query.get("pattern", "*")
        if len(pattern) > 512 or not (pattern.startswith("/") or pattern.startswith("*")):
            reason = "pattern: expected a path glob such as /v1/chat/* (at most 512 characters)"
            return web.json_response({"error": {"code": "bad_request", "message": reason}}, status=400)
        known = self.engine.policy.provider(provider) if provider is not None else None
        if provider is not None and (known is None or known.cache is None):  # never quote the value back
            reason = "provider: no provider of that name has a cache"
            return web.json_response({"error": {"code": "not_found", "message": reason}}, status=404)
        cache = self.engine.addons.capability(CACHE_ADMIN)
        deleted = await cache.delete(provider, pattern) if cache is not None else 0
        return web.json_response({"deleted": deleted})

    async def reload(self, _request: web.Request) -> web.Response:
        before = self.engine.policy.digest
        try:
            policy = await self.engine.reload_from_file()
        except PolicyError as err:
            problems = [p._asdict() for p in err.problems]
            return web.json_response({"error": {"code": "policy_invalid", "problems": problems}}, status=422)
        except Exception as exc:  # noqa: BLE001 - an addon rejected it; name only the type
            reason = f"an addon rejected the policy ({type(exc).__name__})"
            body = {"error": {"code": "policy_rejected", "message": reason}}
            return web.json_response(body, status=422)
        changed = policy.digest != before
        return web.json_response({"digest": policy.digest, "version": policy.digest, "changed": changed})
