"""The ``sidekey`` command line's arguments: every subcommand, flag, default
and environment variable, and the checks of a value's form (addresses,
worker counts). Parsing only: ``proxy.cli`` acts on what it returns.
"""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from proxy import __version__, inject_cli, startup


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def address(value: str, flag: str, example_port: int) -> tuple[str, int]:
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
