"""``sidekey`` command line: init, run, check, ca, dlq (the arguments are ``proxy.cli_args``)."""

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

from proxy import check_cmd, dlq_cmd, fdlimit, inject_cli, locate, memtrim, startup
from proxy.cli_args import address, build_parser, in_pod
from proxy.policy import Policy

if TYPE_CHECKING:
    from proxy.admin import AdminServer
    from proxy.server import Sidekey

log = logging.getLogger("sidekey")


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
    try:
        args.malloc_trim_interval = memtrim.trim_interval(os.environ)  # the trimmer starts with serve()
    except ValueError as exc:
        raise startup.BadChoice(name=f"${exc}", choices="0 (off) or a number of seconds") from None
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
        host, port = address(args.admin, "--admin", 9090)
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
        metrics_host, metrics_port = address(args.metrics_listen, "--metrics-listen", 9091)
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
    trimmer = asyncio.create_task(memtrim.trim_forever(args.malloc_trim_interval), name="sidekey-malloc-trim")
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
