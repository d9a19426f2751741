"""``sidekey`` command line: run, check, ca, dlq."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.policy import Policy

if TYPE_CHECKING:
    from proxy.dlq_store import ReplayRequest

log = logging.getLogger("sidekey")


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="sidekey", description="Credential-holding egress proxy for AI and data APIs."
    )
    parser.add_argument("--version", action="version", version=f"sidekey {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument(
        "--policies", default=env("SIDEKEY_POLICIES", "policies.yaml"), help="policy file [$SIDEKEY_POLICIES]"
    )
    run.add_argument(
        "--listen", type=_listen, default=env("SIDEKEY_LISTEN", "127.0.0.1:8080"), help="HOST:PORT [$SIDEKEY_LISTEN]"
    )
    run.add_argument("--certs", default=env("SIDEKEY_CERTS", "certs"), help="CA directory [$SIDEKEY_CERTS]")
    run.add_argument("--addon", action="append", default=[], help="extra addon: module, module:Class or file.py")
    run.add_argument(
        "--grace", type=float, default=float(env("SIDEKEY_GRACE", "30")), help="drain time on SIGTERM, seconds"
    )
    run.add_argument(
        "--admin", default=env("SIDEKEY_ADMIN", "127.0.0.1:9090"), help="admin HOST:PORT, or 'off' [$SIDEKEY_ADMIN]"
    )
    run.add_argument(
        "--audit", default=env("SIDEKEY_AUDIT"), metavar="PATH|-",
        help="audit log: one JSON line per request to PATH (rotated) or - for stdout [$SIDEKEY_AUDIT]",
    )  # fmt: skip
    run.add_argument(
        "--audit-bodies", action="store_true", help="also log small JSON request bodies, credential-like keys redacted"
    )
    run.add_argument(
        "--dlq", default=env("SIDEKEY_DLQ"), metavar="PATH",
        help="dead-letter queue: requests that failed after all retries, one JSON line each (rotated) [$SIDEKEY_DLQ]",
    )  # fmt: skip
    run.add_argument(
        "--dlq-body-bytes", type=int, default=int(env("SIDEKEY_DLQ_BODY_BYTES", "65536")), metavar="N",
        help="keep request bodies up to N bytes in dead letters; 0 never keeps bodies [$SIDEKEY_DLQ_BODY_BYTES]",
    )  # fmt: skip
    run.add_argument(
        "--watch-interval", type=float, default=float(env("SIDEKEY_WATCH_INTERVAL", "1")),
        help="seconds between policy file checks; 0 disables (SIGHUP and POST /policy/reload still work)",
    )  # fmt: skip
    run.add_argument(
        "--log-level", default=env("SIDEKEY_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING [$SIDEKEY_LOG_LEVEL]"
    )
    run.add_argument(
        "--log-format", choices=("auto", "text", "json"), default=env("SIDEKEY_LOG_FORMAT", "auto"),
        help="text, or JSON lines; auto: text on a terminal, else JSON [$SIDEKEY_LOG_FORMAT]",
    )  # fmt: skip
    run.add_argument(
        "--access-log", choices=("on", "off"), default=env("SIDEKEY_ACCESS_LOG", "on"),
        help="one INFO line per request [$SIDEKEY_ACCESS_LOG]",
    )  # fmt: skip

    check = sub.add_parser("check", help="validate a policy file without starting")
    check.add_argument("policies", nargs="?", default=env("SIDEKEY_POLICIES", "policies.yaml"))
    check.add_argument(
        "--against", metavar="ADMIN_URL", help="diff against a running sidekey, e.g. http://127.0.0.1:9090"
    )

    ca = sub.add_parser("ca", help="print the CA certificate path and how to trust it")
    ca.add_argument("--certs", default=env("SIDEKEY_CERTS", "certs"), help="CA directory [$SIDEKEY_CERTS]")
    ca.add_argument("--bundle", metavar="PATH", help="write the system CAs plus sidekey's to PATH")

    dlq_file = argparse.ArgumentParser(add_help=False)
    dlq_file.add_argument("--dlq", default=env("SIDEKEY_DLQ"), metavar="PATH", help="dead-letter file [$SIDEKEY_DLQ]")
    dlq = sub.add_parser("dlq", help="list and replay dead letters (requests that failed after all retries)")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", parents=[dlq_file], help="newest first")
    dlq_list.add_argument("--limit", type=int, default=50, help="show at most N entries; 0 for all")
    dlq_list.add_argument("--json", action="store_true", help="one JSON entry per line, with its replay mark")
    replay = dlq_sub.add_parser("replay", parents=[dlq_file], help="send a dead letter again through sidekey")
    replay.add_argument("id", help="the request id (x-sidekey-request-id) of the entry")
    replay.add_argument(
        "--proxy", default=env("SIDEKEY_PROXY", "http://" + env("SIDEKEY_LISTEN", "127.0.0.1:8080")),
        help="the running sidekey [$SIDEKEY_PROXY]",
    )  # fmt: skip
    replay.add_argument("--certs", default=env("SIDEKEY_CERTS", "certs"), help="sidekey's CA dir [$SIDEKEY_CERTS]")
    replay.add_argument("--without-body", action="store_true", help="replay an entry whose body was not stored")
    replay.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole replay")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args.policies, args.against)
    if args.command == "ca":
        return cmd_ca(Path(args.certs), args.bundle)
    if args.command == "dlq":
        if not args.dlq:
            print("no dead-letter file: pass --dlq PATH or set SIDEKEY_DLQ", file=sys.stderr)
            return 2
        if args.dlq_command == "list":
            return cmd_dlq_list(args.dlq, args.limit, args.json)
        return cmd_dlq_replay(args)
    return cmd_run(args)


def load_or_report(path: str) -> Policy | None:
    """The policy, or None after printing why not (file, line, field)."""
    from proxy.policy_load import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as err:
        print(err, file=sys.stderr)
    except OSError as err:
        print(f"{path}: cannot read ({err.strerror})", file=sys.stderr)
    return None


def cmd_check(path: str, against: str | None = None) -> int:
    policy = load_or_report(path)
    if policy is None:
        return 2
    print(f"{path}: ok, version {policy.version}, {len(policy.providers)} providers, unmatched: {policy.unmatched}")
    for p in policy.providers:
        source = p.auth.secret.source if p.auth.secret else "-"
        print(f"  {p.name}: {', '.join(p.hosts)} -> auth {p.auth.type} ({source})")
        if len(p.targets) > 1:
            members = ", ".join(f"{t.name} ({t.secret.source if t.secret else source})" for t in p.targets)
            print(f"    upstreams ({p.balance}): {members}")
        if p.fallbacks:
            print(f"    fallbacks: {', '.join(fb.provider for fb in p.fallbacks)}")
    if against:
        return print_diff(policy, against)
    return 0


def print_diff(policy: Policy, admin_url: str) -> int:
    """Providers added, removed and changed relative to a running sidekey."""
    import json
    import urllib.request

    from proxy.admin import policy_view
    from proxy.policy_diff import diff_providers

    request = urllib.request.Request(admin_url.rstrip("/") + "/policy")
    token = os.environ.get("SIDEKEY_ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - operator-given admin URL
            running = json.load(response)
    except (OSError, ValueError) as err:
        print(f"cannot read the running policy from {admin_url} ({type(err).__name__})", file=sys.stderr)
        return 2
    added, removed, changed = diff_providers(running["providers"], policy_view(policy)["providers"])
    print(f"against {admin_url} (running version {running.get('version')}):")
    for name in added:
        print(f"  + {name}")
    for name in removed:
        print(f"  - {name}")
    for name, fields in changed:
        print(f"  ~ {name} ({', '.join(fields)})")
    if not (added or removed or changed):
        print("  no provider changes")
    return 0


def cmd_ca(certs: Path, bundle: str | None) -> int:
    from proxy.certs import CertificateAuthority
    from proxy.trust import trust_instructions, write_trust_bundle

    ca = CertificateAuthority.load_or_create(certs)
    print(ca.cert_path.resolve())
    if bundle:
        out = write_trust_bundle(ca.cert_path, Path(bundle))
        print(f"wrote trust bundle {out.resolve()}", file=sys.stderr)
    print(trust_instructions(ca.cert_path.resolve()), file=sys.stderr)
    return 0


def cmd_dlq_list(path: str, limit: int, as_json: bool) -> int:
    import itertools
    import json

    from proxy.dlq_store import DeadLetterFile, table

    store = DeadLetterFile(path)
    letters = list(itertools.islice(store.letters(), limit or None))
    if as_json:
        for letter in letters:
            print(json.dumps({**letter.entry, "replayed": letter.replay}, ensure_ascii=False))
    elif letters:
        print("\n".join(table(letters)))
    else:
        print(f"{path}: no dead letters", file=sys.stderr)
    if store.skipped:
        print(f"{path}: skipped {store.skipped} unreadable lines", file=sys.stderr)
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Send a stored request again through the running sidekey, which injects
    the real credential (the entry holds none). Exit 0 on a 2xx answer."""
    import time

    from proxy.dlq_store import DeadLetterFile, replay_request

    store = DeadLetterFile(args.dlq)
    letter = store.find(args.id)
    if letter is None:
        print(f"{args.dlq}: no dead letter {args.id}", file=sys.stderr)
        return 2
    request = replay_request(letter.entry, without_body=args.without_body)
    if isinstance(request, str):
        print(f"refusing to replay: {request}", file=sys.stderr)
        return 2
    ca = Path(args.certs) / "sidekey-ca.pem"
    if not ca.is_file():
        print(f"{ca}: no sidekey CA certificate (pass --certs DIR)", file=sys.stderr)
        return 2
    import aiohttp

    try:
        status, new_id = asyncio.run(_send_replay(request, args.proxy, ca, args.timeout))
    except (aiohttp.ClientError, OSError, TimeoutError) as err:  # the type only: a message may quote the URL
        print(f"replay of {args.id} failed: {type(err).__name__}", file=sys.stderr)
        return 1
    store.mark_replayed(args.id, status, new_id, time.time())
    print(f"replayed {args.id}: {status} (x-sidekey-request-id {new_id or '-'})")
    return 0 if 200 <= status < 300 else 1


async def _send_replay(request: ReplayRequest, proxy: str, ca: Path, seconds: float) -> tuple[int, str | None]:
    import ssl

    import aiohttp
    from yarl import URL

    context = ssl.create_default_context(cafile=str(ca))  # verification on: sidekey's CA only
    async with aiohttp.ClientSession(trust_env=False, auto_decompress=False) as session:
        async with session.request(
            request.method, URL(request.url, encoded=True), headers=request.headers, data=request.body,
            proxy=proxy, ssl=context, timeout=aiohttp.ClientTimeout(total=seconds),
        ) as resp:  # fmt: skip
            await resp.read()
            return resp.status, resp.headers.get("x-sidekey-request-id")


def cmd_run(args: argparse.Namespace) -> int:
    from proxy import logs

    if args.log_format not in logs.FORMATS or args.access_log not in ("on", "off"):  # from the environment
        print("SIDEKEY_LOG_FORMAT: auto, text or json; SIDEKEY_ACCESS_LOG: on or off", file=sys.stderr)
        return 2
    logs.configure(args.log_level, args.log_format, sys.stderr)
    policy = load_or_report(args.policies)
    if policy is None:
        return 2
    log.info("policy %s: version %s, %d providers", policy.source, policy.version, len(policy.providers))
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    return runner(serve(policy, args))


async def serve(policy: Policy, args: argparse.Namespace) -> int:
    from addons import default_addons, load_addons
    from addons.metrics import Metrics
    from proxy.admin import AdminConfigError, AdminServer
    from proxy.engine import Sidekey
    from proxy.watch import PolicyWatcher

    extra: list[object] = []
    for spec in (*policy.addons, *args.addon):
        extra.extend(load_addons(spec))
    if args.audit:
        from addons.audit import AuditLog

        extra.insert(0, AuditLog(args.audit, log_bodies=args.audit_bodies))
    if args.dlq:
        from addons.dlq import DeadLetters

        try:
            extra.insert(0, DeadLetters(args.dlq, max_body_bytes=args.dlq_body_bytes))
        except (OSError, ValueError) as err:
            log.error("dead-letter file %s: %s", args.dlq, err)
            return 2
    addons = [*default_addons(access_log=args.access_log == "on"), *extra]
    engine = Sidekey(policy, certs_dir=Path(args.certs), listen=args.listen, addons=addons)
    metrics = next((a for a in addons if isinstance(a, Metrics)), None)
    if metrics is not None:
        metrics.attach(engine.statistics)
    admin = None
    if args.admin != "off":
        host, port = _listen(args.admin)
        try:
            admin = AdminServer(engine, metrics, host=host, port=port, token=os.environ.get("SIDEKEY_ADMIN_TOKEN"))
        except AdminConfigError as err:
            log.error("%s (set SIDEKEY_ADMIN_TOKEN)", err)
            return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()

    def on_sighup() -> None:
        task: asyncio.Task[object] = asyncio.create_task(_quiet(engine.reload_from_file()))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await engine.start()
    if admin is not None:
        log.info("admin listening on %s:%d", *await admin.start())
    watcher = PolicyWatcher(policy.source, engine.reload_from_file, interval=args.watch_interval)
    if args.watch_interval > 0:
        await watcher.start()
    await stop.wait()
    log.info("draining (grace %.0fs, %d in flight)", args.grace, engine.in_flight)
    await watcher.stop()
    await engine.shutdown(args.grace)
    if admin is not None:
        await admin.close()
    return 0


async def _quiet(aw: Awaitable[object]) -> object:
    """A reload's failure is logged where it happens; the signal handler
    only needs it not to surface as an unretrieved task exception."""
    try:
        return await aw
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
