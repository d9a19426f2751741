"""``sidekey`` command line: init, run, check, ca, dlq."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from proxy import __version__, locate, startup
from proxy.policy import Policy

if TYPE_CHECKING:
    from proxy.dlq_store import ReplayRequest

log = logging.getLogger("sidekey")


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other start-up failure (argparse would add the usage).
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []):  # nothing worth showing; the help says what applies
            return action.help
        return super()._get_help_string(action)


_DEBUG_HELP = "on a start-up failure, show the traceback too [$SIDEKEY_DEBUG=1]"
_CERTS_HELP = "CA directory [$SIDEKEY_CERTS]; default: <config dir>/certs for a policy found there, else ./certs"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def in_pod() -> bool:
    """Inside a Kubernetes pod (the kubelet sets this in every container)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = _Parser(prog="sidekey", description="Credential-holding egress proxy for AI and data APIs.")
    parser.add_argument("--version", action="version", version=f"sidekey {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="write a starter policy and the CA into a config directory")
    init.add_argument(
        "dir", nargs="?", metavar="DIR",
        help="default: $SIDEKEY_HOME, else $XDG_CONFIG_HOME/sidekey, else ~/.config/sidekey",
    )  # fmt: skip
    init.add_argument("--debug-tracebacks", action="store_true", help=_DEBUG_HELP)

    run = sub.add_parser("run", help="run the proxy", formatter_class=_Help)
    run.add_argument(
        "--policies", metavar="FILE",
        help="policy file [$SIDEKEY_POLICIES]; default: ./policies.yaml, else <config dir>/policies.yaml",
    )  # fmt: skip
    run.add_argument(
        "--listen", type=_listen, default=env("SIDEKEY_LISTEN", "127.0.0.1:8080"), help="HOST:PORT [$SIDEKEY_LISTEN]"
    )
    run.add_argument("--certs", metavar="DIR", help=_CERTS_HELP)
    run.add_argument("--addon", action="append", default=[], help="extra addon: module, module:Class or file.py")
    run.add_argument(
        "--grace", type=float, default=float(env("SIDEKEY_GRACE", "30")), help="drain time on SIGTERM, seconds"
    )
    run.add_argument(
        "--admin", default=env("SIDEKEY_ADMIN", "127.0.0.1:9090"), help="admin HOST:PORT, or 'off' [$SIDEKEY_ADMIN]"
    )
    run.add_argument(
        "--metrics-listen", default=env("SIDEKEY_METRICS_LISTEN", "off"), metavar="HOST:PORT|off",
        help="a listener serving only /metrics, /healthz and /readyz without a token, for Prometheus and "
        "probes (e.g. the pod's address:9091) [$SIDEKEY_METRICS_LISTEN]",
    )  # fmt: skip
    run.add_argument(
        "--admin-require-token", action="store_true", default=_truthy(env("SIDEKEY_ADMIN_REQUIRE_TOKEN")),
        help="require SIDEKEY_ADMIN_TOKEN on the admin API even on loopback; on by itself inside a Kubernetes "
        "pod, whose containers share the loopback [$SIDEKEY_ADMIN_REQUIRE_TOKEN]",
    )  # fmt: skip
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
        "--log-level", default=env("SIDEKEY_LOG_LEVEL", "INFO"),
        help=f"{', '.join(startup.LOG_LEVELS)} [$SIDEKEY_LOG_LEVEL]",
    )  # fmt: skip
    run.add_argument("--debug-tracebacks", action="store_true", help=_DEBUG_HELP)

    check = sub.add_parser("check", help="validate a policy file without starting")
    check.add_argument("policies", nargs="?", default=env("SIDEKEY_POLICIES", "policies.yaml"))
    check.add_argument(
        "--against", metavar="ADMIN_URL", help="diff against a running sidekey, e.g. http://127.0.0.1:9090"
    )
    check.add_argument(
        "--strict", action="store_true", help="secrets that are unset, missing or unreadable are errors (exit 1)"
    )

    ca = sub.add_parser("ca", help="print the CA certificate path and how to trust it")
    ca.add_argument("--certs", metavar="DIR", help=_CERTS_HELP)
    ca.add_argument("--bundle", metavar="PATH", help="write the system CAs plus sidekey's to PATH")
    ca.add_argument("--debug-tracebacks", action="store_true", help=_DEBUG_HELP)

    dlq_file = _Parser(add_help=False)
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
    try:
        return dispatch(args)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers are installed
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place a failure becomes one line
        if getattr(args, "debug_tracebacks", False) or os.environ.get("SIDEKEY_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        failure = startup.explain(exc)
        print(failure, file=sys.stderr)
        return failure.exit_code


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "init":
        from proxy import init_cmd

        print(init_cmd.init(args.dir, os.environ, Path.home()), end="")
        return 0
    if args.command == "check":
        return cmd_check(args.policies, args.against, strict=args.strict)
    if args.command == "ca":
        return cmd_ca(locate.ca_dir_for_ca_command(args.certs, os.environ, Path.home(), Path.is_file), args.bundle)
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


def cmd_check(path: str, against: str | None = None, *, strict: bool = False) -> int:
    """Exit 2: the file is invalid. Exit 1 (``strict``): a secret it names
    cannot be read here; without ``strict`` that is a warning and exit 0."""
    from proxy.policy import SCHEMA_VERSION
    from proxy.secrets import read_secret, secret_uses

    policy = load_or_report(path)
    if policy is None:
        return 2
    print(
        f"{path}: ok, schema version {SCHEMA_VERSION}, content digest {policy.digest}, "
        f"{len(policy.providers)} providers, unmatched: {policy.unmatched}"
    )
    for p in policy.providers:
        default = p.secret_of(p.targets[0]) if len(p.targets) == 1 else p.auth.secret
        source = default.source if default else "-"
        print(f"  {p.name}: {', '.join(p.hosts)} -> auth {p.auth.type} ({source})")
        if len(p.targets) > 1:
            members = ", ".join(f"{t.name} ({t.secret.source if t.secret else source})" for t in p.targets)
            print(f"    upstreams ({p.balance}): {members}")
        if p.fallbacks:
            print(f"    fallbacks: {', '.join(fb.provider for fb in p.fallbacks)}")
    # The source and the problem only: the value, when there is one, stays here.
    level = "error" if strict else "warning"
    unreadable = [(who, ref, problem) for who, ref in secret_uses(policy) if (problem := read_secret(ref)[1])]
    for who, ref, problem in unreadable:
        print(f"{path}: {level}: {who}: {ref.source} {problem}", file=sys.stderr)
    status = 1 if strict and unreadable else 0
    if against:
        return print_diff(policy, against) or status
    return status


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
    digest = running.get("digest", running.get("version"))  # "version": its former name, still served
    print(f"against {admin_url} (running content digest {digest}):")
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
    logging.basicConfig(
        level=startup.log_level(args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    env = os.environ
    location = locate.locate_policy(args.policies, env, locate.config_dir(env, Path.home()), Path.is_file)
    policy = startup.load_policy(str(location.path))
    certs = locate.certs_dir(args.certs, env, location)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    return runner(serve(policy, args, location, certs))


async def serve(policy: Policy, args: argparse.Namespace, location: locate.PolicyLocation, certs: Path) -> int:
    from addons import default_addons, load_addons
    from addons.metrics import Metrics
    from proxy.admin import AdminConfigError, AdminServer
    from proxy.engine import Sidekey
    from proxy.watch import PolicyWatcher

    extra: list[object] = []
    for spec in (*policy.addons, *args.addon):
        try:
            extra.extend(load_addons(spec))
        except Exception as exc:  # noqa: BLE001 - an operator's addon: name it and the type only
            raise startup.AddonUnloadable(spec=spec, kind=type(exc).__name__) from exc
    if args.audit:
        from addons.audit import AuditLog

        extra.insert(0, AuditLog(args.audit, log_bodies=args.audit_bodies))
    if args.dlq:
        from addons.dlq import DeadLetters

        try:
            extra.insert(0, DeadLetters(args.dlq, max_body_bytes=args.dlq_body_bytes))
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise startup.DeadLetterFileUnusable(path=args.dlq, reason=reason) from None
        except ValueError as err:  # our own fixed texts (negative sizes)
            raise startup.DeadLetterFileUnusable(path=args.dlq, reason=str(err)) from None
    addons = [*default_addons(), *extra]
    engine = Sidekey(policy, certs_dir=certs, listen=args.listen, addons=addons)
    metrics = next((a for a in addons if isinstance(a, Metrics)), None)
    if metrics is not None:
        metrics.attach(engine.statistics)
    admin = None
    if args.admin != "off":
        try:
            host, port = _listen(args.admin)
        except argparse.ArgumentTypeError:
            raise startup.BadAddress(flag="--admin", alternative=" or off", port=9090) from None
        try:
            admin = AdminServer(
                engine, metrics, host=host, port=port, token=os.environ.get("SIDEKEY_ADMIN_TOKEN") or None,
                require_token=args.admin_require_token or in_pod(),
            )  # fmt: skip
        except AdminConfigError:
            if args.admin_require_token or in_pod():
                raise startup.PodAdminNeedsToken() from None
            raise startup.AdminNeedsToken(host=host) from None
    scrape = None
    if args.metrics_listen != "off":
        try:
            metrics_host, metrics_port = _listen(args.metrics_listen)
        except argparse.ArgumentTypeError:
            raise startup.BadAddress(flag="--metrics-listen", alternative=" or off", port=9091) from None
        scrape = AdminServer.metrics_only(engine, metrics, host=metrics_host, port=metrics_port)
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
    admin_address, metrics_address = await startup.start_listeners(engine, admin, scrape)
    log.info("policy %s (via %s); CA in %s", location.path, location.found_by, certs)
    await engine.announce()
    if admin_address is not None:
        log.info("admin listening on %s:%d", *admin_address)
    if metrics_address is not None:
        log.info("metrics listening on %s:%d", *metrics_address)
    watcher = PolicyWatcher(policy.source, engine.reload_from_file, interval=args.watch_interval)
    if args.watch_interval > 0:
        await watcher.start()
    await stop.wait()
    log.info("draining (grace %.0fs, %d in flight)", args.grace, engine.in_flight)
    await watcher.stop()
    await engine.shutdown(args.grace)
    for server in (admin, scrape):
        if server is not None:
            await server.close()
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
