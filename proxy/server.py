"""The engine: owns the listener, the policy reference, addons, the CA and the
upstream pools; accepts connections and dispatches CONNECT, plain-proxy
requests and blind tunnels; drains on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from redis.asyncio import Redis

from proxy import attempt_loop, errors, http_session, netguard, responses, routing, tunnel, ws_session
from proxy.balance import Groups, Transition, UpstreamState, flip_line
from proxy.ca_watch import CAFiles
from proxy.capabilities import SECRETS, Capability
from proxy.certs import CertificateAuthority
from proxy.conn import ClientConn
from proxy.flow import new_request_id
from proxy.hooks import AddonManager
from proxy.leaf_contexts import LeafContexts
from proxy.policy import Policy, Provider, SecretRef

T = TypeVar("T")
log = logging.getLogger("sidekey")

CONNECTED = b"HTTP/1.1 200 Connection established\r\n\r\n"
TUNNEL_CONNECT_TIMEOUT = 10.0
POOL_CHECK_INTERVAL = 1.0  # CA files re-checked (a stat each), retired pools closed when drained
PIPE_PIECE = 65536


class Sidekey:
    def __init__(
        self,
        policy: Policy,
        *,
        certs_dir: Path,
        listen: tuple[str, int] = ("127.0.0.1", 8080),
        addons: Sequence[object] = (),
        reuse_port: bool = False,  # one of --workers N processes on a shared port
    ) -> None:
        from proxy.upstream import UpstreamPools

        self.policy = policy
        self.self_ports: frozenset[int] = frozenset()
        self.guard = netguard.Guard(policy.allow_networks)
        self.certs_dir = certs_dir
        self.listen = listen
        self.reuse_port = reuse_port
        self.addons = AddonManager(addons)
        self.pools = UpstreamPools()
        self.ca: CertificateAuthority | None = None
        self.ca_files: CAFiles | None = None
        self.leaves: LeafContexts | None = None
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] = listen
        self.draining = False
        # Injected so retry schedules are deterministic in tests.
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.random: Callable[[], float] = random.random
        self.in_flight = 0
        self.connections: set[ClientConn] = set()
        self.websockets = ws_session.Sessions()  # open WebSocket sessions: limits, drain, metrics
        # Circuit, health and load of every upstream member, kept across reloads.
        self.groups = Groups()
        # Who is told when a member turns unhealthy or its circuit opens or
        # closes (the alerts addon registers here); called on the loop, must not block.
        self.listeners: list[Callable[[UpstreamState, Transition], None]] = []
        self.secrets = self.addons.capability(SECRETS)
        self.counters = {"connections": 0, "tunnels": 0, "intercepted": 0, "tls_failures": 0, "tls_to_plain_port": 0}
        self.reloads = {"ok": 0, "unchanged": 0, "failed": 0}
        self.policy_loaded_at = time.time()
        self._reload_lock = asyncio.Lock()
        # Shared state between sidecars (limits, usage), from the policy's redis section.
        self.redis: Redis | None = None
        self._redis_id: tuple[str, float] | None = None
        self._pool_upkeep: asyncio.Task[None] | None = None
        self.addons.setup(self)  # addons that work beside the flows (health checks, alerts, Redis users)

    @property
    def leaf_contexts(self) -> LeafContexts:
        assert self.leaves is not None, "start() first"
        return self.leaves

    async def start(self) -> None:
        """Prepare, bind and announce in one go (the CLI calls the three
        steps itself, to bind the admin listener before announcing either)."""
        await self.prepare()
        await self.bind()
        await self.announce()

    async def prepare(self) -> None:
        """Load (or create) the CA, connect Redis, let addons configure the policy."""
        self.ca = await asyncio.to_thread(CertificateAuthority.load_or_create, self.certs_dir)
        self.ca_files = CAFiles(self.ca.cert_path, self.ca.key_path, self.ca.fingerprints())
        self.leaves = LeafContexts(self.ca)
        await self._connect_redis(self.policy)
        await self.pools.maintain(self.policy)
        await self.addons.configure(self.policy)

    async def bind(self) -> None:
        """Bind the listener; connections are accepted from here on. Raises
        OSError when the address cannot be bound (in use, not ours)."""
        self.server = await asyncio.start_server(
            self._on_client,
            self.listen[0],
            self.listen[1],
            limit=self.policy.limits.max_header_bytes,
            backlog=1024,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
        )
        sock = self.server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        self.protect_port(self.address[1])

    async def announce(self) -> None:
        """Addons start their background work; the log says where we listen."""
        self._pool_upkeep = asyncio.create_task(self._keep_pools(), name="sidekey-pool-upkeep")
        await self.addons.observe("running")
        log.info("sidekey listening on %s:%d (%d providers)", *self.address, len(self.policy.providers))

    async def close_unstarted(self) -> None:
        """Undo ``prepare``/``bind`` after a start-up failure, quietly: no
        addon saw ``running``, so there is nothing to drain or announce."""
        if self.server is not None:
            self.server.close()
        await self.pools.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.leaves is not None:
            self.leaves.close()

    async def _keep_pools(self) -> None:
        while True:
            await asyncio.sleep(POOL_CHECK_INTERVAL)
            try:
                await self.pools.maintain(self.policy)
                if self.ca_files is not None:  # replaced on disk: said once; the loaded CA stays
                    await self.ca_files.check()
            except Exception as exc:  # noqa: BLE001 - the pools keep serving what they have
                log.error("upstream pool upkeep failed: %s", errors.describe(exc))

    async def _connect_redis(self, policy: Policy) -> None:
        from proxy import redis_client, secrets

        cfg = policy.redis
        url = await asyncio.to_thread(secrets.resolve_ref, cfg.url) if cfg is not None else None
        ident = (url, cfg.timeout) if url is not None and cfg is not None else None
        if ident == self._redis_id:
            return
        old, self.redis, self._redis_id = self.redis, None, ident
        if ident is not None:
            self.redis = redis_client.connect(*ident)
        elif cfg is not None:
            log.warning("redis: %s is not set; limits and usage are per process",
                        cfg.url.source if isinstance(cfg.url, SecretRef) else "the policy's redis.url")  # fmt: skip
        if old is not None:
            await old.aclose()

    clock = staticmethod(time.monotonic)

    def capability(self, cap: Capability[T]) -> T | None:
        return self.addons.capability(cap)

    def on_state_change(self, listener: Callable[[UpstreamState, Transition], None]) -> None:
        self.listeners.append(listener)

    async def probe(self, provider: Provider, state: UpstreamState, method: str, path: str) -> int:
        return await attempt_loop.probe(self, provider, state, method, path)

    def notify(self, state: UpstreamState, changes: Sequence[Transition]) -> None:
        for change in changes:
            untold = flip_line(state, change, self.clock())
            level = logging.WARNING if change in ("unhealthy", "circuit_open") else logging.INFO
            also = f" ({untold} more flips since the last line like this, logged at DEBUG)" if untold else ""
            log.log(logging.DEBUG if untold is None else level, "upstream %s/%s (%s:%d): %s%s",
                    state.provider, state.name, state.host, state.port, change, also)  # fmt: skip
            for listener in self.listeners:
                try:
                    listener(state, change)
                except Exception as exc:  # noqa: BLE001 - a listener never breaks a request
                    log.error("state listener failed: %s", type(exc).__name__)

    def protect_port(self, port: int) -> None:
        """Never tunnel or forward to this loopback port (our own listeners)."""
        self.self_ports = self.self_ports | {port}
        self.guard = netguard.Guard(self.policy.allow_networks, self.self_ports)

    async def reload(self, policy: Policy) -> None:
        """Let every addon accept the new policy, then swap one reference.
        If an addon raises, the old policy stays and the error propagates.
        Flows in flight keep the snapshot they started with; pools are keyed
        by upstream identity, so unchanged providers keep their connections."""
        await self._connect_redis(policy)
        await self.pools.maintain(policy, self.policy)  # the new policy's CA files, read before it serves
        await self.addons.configure(policy)
        if policy.addons != self.policy.addons:
            log.warning("policy reload: the addons list changed; restart sidekey to load addons")
        self.policy = policy
        self.guard = netguard.Guard(policy.allow_networks, self.self_ports)
        self.policy_loaded_at = time.time()
        retired = self.pools.retire_unreachable(policy, self.guard)
        if retired:
            log.debug("policy reload: %d upstream pools retired (closed once their requests finish)", retired)

    async def reload_from_file(self) -> Policy:
        """Re-read the policy file. Invalid or rejected: the old policy stays,
        the error (file, line, field; never a value) is logged and counted."""
        from proxy.policy.load import PolicyError, load_policy

        async with self._reload_lock:
            try:
                policy = await asyncio.to_thread(load_policy, self.policy.source)
                if policy.digest == self.policy.digest:
                    self.reloads["unchanged"] += 1
                    return self.policy
                await self.reload(policy)
            except PolicyError as err:
                self.reloads["failed"] += 1
                log.error("policy reload rejected, keeping digest %s:\n%s", self.policy.digest, err)
                raise
            except Exception as exc:
                self.reloads["failed"] += 1
                log.error(
                    "policy reload rejected by an addon, keeping digest %s: %s",
                    self.policy.digest,
                    errors.describe(exc),
                )
                raise
            self.reloads["ok"] += 1
            log.info("policy reloaded: digest %s, %d providers", policy.digest, len(policy.providers))
            return policy

    def secret_available(self, provider: Provider) -> bool | None:
        return self.secrets.secret_available(provider) if self.secrets is not None else None

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting, close idle connections, let in-flight requests and
        streams finish within ``grace`` seconds, then cut what is left."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.idle:
                conn.writer.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            for conn in list(self.connections):
                if conn.idle:
                    conn.writer.close()
            await asyncio.sleep(0.05)
        await self.websockets.close_all()  # after the grace: 1001 to both sides of each session
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
        await self.addons.observe("done")
        if self._pool_upkeep is not None:
            self._pool_upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pool_upkeep
        await self.pools.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.leaves is not None:
            self.leaves.close()
        log.info("sidekey stopped")

    def statistics(self) -> dict[str, Any]:
        return {
            **self.counters,
            "reloads": dict(self.reloads),
            "upstreams": self.groups.statistics(),
            "open_connections": len(self.connections),
            "in_flight": self.in_flight,
            "websockets": self.websockets.statistics(),
            "pools": self.pools.statistics(),
            "leaf_certs": self.leaves.statistics() if self.leaves else {},
            "credentials": [
                {"provider": p.name, **view} for p in self.policy.providers for view in self.secrets.credential_views(p)
            ]
            if self.secrets is not None
            else [],
        }

    # -- connections -------------------------------------------------------
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ClientConn(reader, writer)
        self.connections.add(conn)
        self.counters["connections"] += 1
        try:
            await self._dispatch(conn)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - one bad connection never takes the listener down
            log.error("connection failed: %s", errors.describe(exc))
        finally:
            self.connections.discard(conn)
            writer.close()

    async def _dispatch(self, conn: ClientConn) -> None:
        limits = self.policy.limits
        conn.idle = True
        try:
            head = await http_session.read_head(conn, limits.header_timeout, limits.max_headers, first=True)
        except errors.ProxyError as err:
            if isinstance(err, errors.TLSOnPlainPort):
                self._tls_on_plain_port(conn)
            await responses.send_error(conn, err, new_request_id())
            return
        finally:
            conn.idle = False
        if head is None:
            return
        if head.method == "CONNECT":
            conn.proxy_user = routing.basic_user(head.headers.get("proxy-authorization"))
            await self._connect(conn, head.target)
        elif head.target.startswith(("http://", "https://")):
            await http_session.serve(self, conn, head)
        else:
            refused = errors.BadRequest(
                reason="sidekey is a forward proxy: send CONNECT host:port or an absolute-form http:// URI"
            )
            await responses.send_error(conn, refused, new_request_id())

    def _tls_on_plain_port(self, conn: ClientConn) -> None:
        """Said once per process (a misconfigured app retries in a loop); counted always."""
        self.counters["tls_to_plain_port"] += 1
        if self.counters["tls_to_plain_port"] == 1:
            log.warning(
                "a client (%s) spoke TLS to the plain proxy port %d: use http:// in HTTPS_PROXY "
                "(HTTPS_PROXY=http://%s:%d); the TLS to the provider runs inside the CONNECT tunnel",
                conn.peer[0] if conn.peer else "-", self.address[1], self.address[0], self.address[1],
            )  # fmt: skip

    async def _connect(self, conn: ClientConn, authority: str) -> None:
        policy = self.policy
        try:
            host, port = routing.parse_authority(authority)
            provider = policy.match(host)
            if provider is None and policy.unmatched == "deny":
                raise errors.UnmatchedDenied(host=host)
        except errors.ProxyError as err:
            await responses.send_error(conn, err, new_request_id())
            return
        if provider is None:
            await self._tunnel(conn, host, port, policy)
            return
        ctx = await self.leaf_contexts.context_for(host)
        conn.writer.write(CONNECTED)
        try:
            await conn.writer.start_tls(ctx, ssl_handshake_timeout=policy.limits.header_timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            # Usually a client that does not trust our CA; say which host.
            self.counters["tls_failures"] += 1
            log.info("TLS handshake with client failed for %s: %s", host, type(exc).__name__)
            return
        self.counters["intercepted"] += 1
        conn.target = (host, port)
        await http_session.serve(self, conn)

    async def _tunnel(self, conn: ClientConn, host: str, port: int, policy: Policy) -> None:
        """Blind relay for unmatched hosts: no interception, no credentials."""
        try:
            up_reader, up_writer = await tunnel.open_checked(host, port, self.guard)
        except errors.ProxyError as err:
            await responses.send_error(conn, err, new_request_id())
            return
        self.counters["tunnels"] += 1
        conn.writer.write(CONNECTED)
        await tunnel.relay(conn.reader, conn.writer, up_reader, up_writer)
