"""``sidekey`` command line: run, check, ca."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Sequence
from pathlib import Path

from proxy import __version__
from proxy.policy import Policy

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
        "--watch-interval", type=float, default=float(env("SIDEKEY_WATCH_INTERVAL", "1")),
        help="seconds between policy file checks; 0 disables (SIGHUP and POST /policy/reload still work)",
    )  # fmt: skip
    run.add_argument(
        "--log-level", default=env("SIDEKEY_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING [$SIDEKEY_LOG_LEVEL]"
    )

    check = sub.add_parser("check", help="validate a policy file without starting")
    check.add_argument("policies", nargs="?", default=env("SIDEKEY_POLICIES", "policies.yaml"))
    check.add_argument(
        "--against", metavar="ADMIN_URL", help="diff against a running sidekey, e.g. http://127.0.0.1:9090"
    )

    ca = sub.add_parser("ca", help="print the CA certificate path and how to trust it")
    ca.add_argument("--certs", default=env("SIDEKEY_CERTS", "certs"), help="CA directory [$SIDEKEY_CERTS]")
    ca.add_argument("--bundle", metavar="PATH", help="write the system CAs plus sidekey's to PATH")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args.policies, args.against)
    if args.command == "ca":
        return cmd_ca(Path(args.certs), args.bundle)
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


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    policy = load_or_report(args.policies)
    if policy is None:
        return 2
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
    addons = [*default_addons(), *extra]
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
