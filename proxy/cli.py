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

from proxy import __version__, check_cmd, dlq_cmd, fdlimit, inject_cli, locate, memtrim, startup
from proxy.policy import Policy

if TYPE_CHECKING:
    from proxy.admin import AdminServer
    from proxy.server import Sidekey

log = logging.getLogger("sidekey")


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def _address(value: str, flag: str, example_port: int) -> tuple[str, int]:
    """A listener option that may also be ``off`` (checked by the caller), or a one-line start-up error."""
    try:
        return _listen(value)
    except argparse.ArgumentTypeError:
        raise startup.BadAddress(flag=flag, alternative=" or off", port=example_port) from None


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
    run.add_argument(
        "--workers", type=_workers, default=env("SIDEKEY_WORKERS", "1"), metavar="N",
        help="N processes on one listener (SO_REUSEPORT); limits, budgets and WebSocket caps then need redis:;"
        " admin/metrics per worker on PORT+i [$SIDEKEY_WORKERS]",
    )  # fmt: skip
    run.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set by the supervisor
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
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
    check.add_argument(
        "--strict", action="store_true", help="secrets that are unset, missing or unreadable are errors (exit 1)"
    )

    ca = sub.add_parser("ca", help="print the CA certificate path and how to trust it")
    ca.add_argument("--certs", metavar="DIR", help=_CERTS_HELP)
    ca.add_argument("--bundle", metavar="PATH", help="write the system CAs plus sidekey's to PATH")
    ca.add_argument(
        "--from", dest="from_dir", metavar="DIR",
        help="copy the CA in DIR (e.g. a mounted Secret) into --certs with mode 0600 for the key; never creates one",
    )  # fmt: skip
    ca.add_argument("--debug-tracebacks", action="store_true", help=_DEBUG_HELP)

    inject_cli.add_parser(sub)

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


def _workers(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 64:
        raise argparse.ArgumentTypeError("expected a number of processes from 1 to 64")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --workers starts children with the same run arguments
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
        return check_cmd.cmd_check(args.policies, args.against, strict=args.strict)
    if args.command == "ca":
        certs = locate.ca_dir_for_ca_command(args.certs, os.environ, Path.home(), Path.is_file)
        return cmd_ca(certs, args.bundle, Path(args.from_dir) if args.from_dir else None)
    if args.command == "inject":
        return inject_cli.cmd_inject(args)
    if args.command == "dlq":
        if not args.dlq:
            print("no dead-letter file: pass --dlq PATH or set SIDEKEY_DLQ", file=sys.stderr)
            return 2
        if args.dlq_command == "list":
            return dlq_cmd.cmd_dlq_list(args.dlq, args.limit, args.json)
        return dlq_cmd.cmd_dlq_replay(args)
    return cmd_run(args)


def cmd_ca(certs: Path, bundle: str | None, from_dir: Path | None = None) -> int:
    from proxy.certs import CertificateAuthority
    from proxy.trust import trust_instructions, write_trust_bundle

    ca = CertificateAuthority.import_from(from_dir, certs) if from_dir else CertificateAuthority.load_or_create(certs)
    print(ca.cert_path.resolve())
    if bundle:
        out = write_trust_bundle(ca.cert_path, Path(bundle))
        print(f"wrote trust bundle {out.resolve()}", file=sys.stderr)
    print(trust_instructions(ca.cert_path.resolve()), file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from proxy import logs

    if args.log_format not in logs.FORMATS:  # from the environment (the flag's choices are checked by argparse)
        raise startup.BadChoice(name="--log-format (or $SIDEKEY_LOG_FORMAT)", choices="auto, text, json")
    if args.access_log not in ("on", "off"):
        raise startup.BadChoice(name="--access-log (or $SIDEKEY_ACCESS_LOG)", choices="on, off")
    logs.configure(startup.log_level(args.log_level), args.log_format, sys.stderr)
    try:
        malloc_options = memtrim.malloc_options(os.environ)
    except ValueError as exc:
        raise startup.BadChoice(name=f"${exc}", choices="0 (glibc's default) or a whole number") from None
    memtrim.set_malloc_options(malloc_options)  # before any thread starts (uvloop's resolver, to_thread workers)
    if args.worker_index is not None:
        log.info("worker %d, pid %d", args.worker_index, os.getpid())
    before, after = fdlimit.raise_fd_limit()
    if after != before:
        log.info("open-files limit raised from %d to %d (the hard limit)", before, after)
    env = os.environ
    location = locate.locate_policy(args.policies, env, locate.config_dir(env, Path.home()), Path.is_file)
    policy = startup.load_policy(str(location.path))
    certs = locate.certs_dir(args.certs, env, location)
    if args.workers > 1:
        return _supervise(args, policy, certs)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    return runner(serve(policy, args, location, certs))


def _supervise(args: argparse.Namespace, policy: Policy, certs: Path) -> int:
    from proxy import workers
    from proxy.certs import CertificateAuthority

    shared_nothing = workers.local_only_state(policy)
    if shared_nothing:
        raise workers.WorkersNeedRedis(workers=args.workers, what=", ".join(shared_nothing))
    CertificateAuthority.load_or_create(certs)  # once, here: N workers must not race to create it
    run_argv = args.argv[args.argv.index("run") + 1 :]
    host, port = args.listen
    return workers.supervise(run_argv, args.workers, host, port, args.admin, args.metrics_listen)


def _addons(policy: Policy, args: argparse.Namespace) -> list[object]:
    """The built-in addons, then the policy's and the command line's, audit and DLQ first among those."""
    from addons import default_addons, load_addons
    from addons.audit import AuditLog
    from addons.dlq import DeadLetters

    extra: list[object] = []
    for spec in (*policy.addons, *args.addon):
        try:
            extra.extend(load_addons(spec))
        except Exception as exc:  # noqa: BLE001 - an operator's addon: name it and the type only
            raise startup.AddonUnloadable(spec=spec, kind=type(exc).__name__) from exc
    if args.audit:
        extra.insert(0, AuditLog(args.audit, log_bodies=args.audit_bodies))
    if args.dlq:
        try:
            extra.insert(0, DeadLetters(args.dlq, max_body_bytes=args.dlq_body_bytes))
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise startup.DeadLetterFileUnusable(path=args.dlq, reason=reason) from None
        except ValueError as err:  # our own fixed texts (negative sizes)
            raise startup.DeadLetterFileUnusable(path=args.dlq, reason=str(err)) from None
    return [*default_addons(access_log=args.access_log == "on"), *extra]


def _attach_metrics(engine: Sidekey, addons: list[object]) -> None:
    """Scrapes read the engine's live statistics, the cache's counts, the limits'
    degraded time and the records the audit log and DLQ lost."""
    from addons.audit import AuditLog
    from addons.cache.addon import Cache
    from addons.dlq import DeadLetters
    from addons.limits import Limits
    from addons.metrics import Metrics

    metrics = next((a for a in addons if isinstance(a, Metrics)), None)
    if metrics is None:
        return
    cache = next((a for a in addons if isinstance(a, Cache)), None)
    if cache is not None:
        metrics.registry.register(cache.stats.collector(cache.backends))
    limits = next((a for a in addons if isinstance(a, Limits)), None)
    sinks = [a for a in addons if isinstance(a, AuditLog | DeadLetters)]

    def statistics() -> dict[str, object]:  # the limits' degraded time and the records lost are metrics too
        stats = engine.statistics()
        if limits is not None:
            stats["limits"] = limits.statistics()
        stats["records_lost"] = {a.name: a.losses.total for a in sinks}
        return stats

    metrics.attach(statistics)


def _admin_servers(engine: Sidekey, args: argparse.Namespace) -> tuple[AdminServer | None, AdminServer | None]:
    """The admin listener and the metrics-only one, as the options ask."""
    from proxy.admin import AdminConfigError, AdminServer

    admin = None
    if args.admin != "off":
        host, port = _address(args.admin, "--admin", 9090)
        try:
            admin = AdminServer(
                engine, host=host, port=port, token=os.environ.get("SIDEKEY_ADMIN_TOKEN") or None,
                require_token=args.admin_require_token or in_pod(),
            )  # fmt: skip
        except AdminConfigError:
            if args.admin_require_token or in_pod():
                raise startup.PodAdminNeedsToken() from None
            raise startup.AdminNeedsToken(host=host) from None
    scrape = None
    if args.metrics_listen != "off":
        metrics_host, metrics_port = _address(args.metrics_listen, "--metrics-listen", 9091)
        scrape = AdminServer.metrics_only(engine, host=metrics_host, port=metrics_port)
    return admin, scrape


async def serve(policy: Policy, args: argparse.Namespace, location: locate.PolicyLocation, certs: Path) -> int:
    from proxy.policy.watch import PolicyWatcher
    from proxy.server import Sidekey

    addons = _addons(policy, args)
    engine = Sidekey(policy, certs_dir=certs, listen=args.listen, addons=addons, reuse_port=args.reuse_port)
    _attach_metrics(engine, addons)
    admin, scrape = _admin_servers(engine, args)
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
    log.info("policy %s (via %s): digest %s, %d providers; CA in %s", location.path, location.found_by,
             policy.digest, len(policy.providers), certs)  # fmt: skip
    await engine.announce()
    if admin_address is not None:
        log.info("admin listening on %s:%d", *admin_address)
    if metrics_address is not None:
        log.info("metrics listening on %s:%d", *metrics_address)
    watcher = PolicyWatcher(policy.source, engine.reload_from_file, interval=args.watch_interval)
    if args.watch_interval > 0:
        await watcher.start()
    interval = float(os.environ.get("SIDEKEY_MALLOC_TRIM_INTERVAL", memtrim.DEFAULT_INTERVAL))
    trimmer = asyncio.create_task(memtrim.trim_forever(interval), name="sidekey-malloc-trim")
    await stop.wait()
    log.info("draining (grace %.0fs, %d in flight)", args.grace, engine.in_flight)
    trimmer.cancel()
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
