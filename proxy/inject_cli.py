"""``sidekey inject``'s I/O: read the file, print the result and the report.
The decisions are in ``proxy.inject``."""

from __future__ import annotations

import argparse
import sys

import yaml

from proxy import __version__
from proxy.inject import InjectError, inject_text
from proxy.sidecar import SidecarConfig


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``sidekey inject``'s options."""
    inject = sub.add_parser("inject", help="add the sidekey sidecar to Kubernetes workloads (YAML to stdout)")
    inject.add_argument("-f", "--filename", required=True, help="YAML file of workloads, or - for stdin")
    inject.add_argument("--image", default=f"sidekey:{__version__}", help="sidekey image (default: %(default)s)")
    inject.add_argument("--policy-configmap", default="sidekey-policy", help="ConfigMap with policies.yaml")
    inject.add_argument(
        "--native-sidecar",
        choices=["auto", "true", "false"],
        default="auto",
        help="auto: native (initContainer, restartPolicy: Always) for Jobs, CronJobs and run-once pods",
    )
    inject.add_argument("--ca-secret", default="sidekey-ca", help="Secret with sidekey-ca.pem and sidekey-ca-key.pem")
    inject.add_argument(
        "--provider-secret",
        default="sidekey-provider-keys",
        help="Secret of provider keys, mounted into sidekey only; '' for none",
    )
    inject.add_argument("--port", type=int, default=8080, help="sidekey's proxy port on 127.0.0.1")
    inject.add_argument("--admin-port", type=int, default=9090, help="sidekey's admin port on 127.0.0.1")
    inject.add_argument(
        "--metrics-port", type=int, default=9091,
        help="sidekey's metrics listener on the pod IP (/metrics, /healthz, /readyz; no token; the probes use it)",
    )  # fmt: skip
    inject.add_argument(
        "--admin-token-secret", default="sidekey-admin-token",
        help="Secret whose key 'token' is SIDEKEY_ADMIN_TOKEN (you create it; inject never writes Secret data)",
    )  # fmt: skip
    inject.add_argument("--no-proxy", default="", help="more NO_PROXY hosts, comma separated")


def cmd_inject(args: argparse.Namespace) -> int:
    source = "stdin" if args.filename == "-" else args.filename
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as f:
                text = f.read()
    except OSError as err:
        print(f"sidekey inject: {source}: cannot read ({err.strerror})", file=sys.stderr)
        return 2
    cfg = SidecarConfig(
        image=args.image,
        port=args.port,
        admin_port=args.admin_port,
        metrics_port=args.metrics_port,
        admin_token_secret=args.admin_token_secret,
        policy_configmap=args.policy_configmap,
        ca_secret=args.ca_secret,
        provider_secret=args.provider_secret,
        no_proxy=tuple(h.strip() for h in args.no_proxy.split(",") if h.strip()),
    )
    try:
        out, outcomes = inject_text(text, cfg, args.native_sidecar)
    except InjectError as err:
        print(f"sidekey inject: {source}: {err}", file=sys.stderr)
        return 2
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        print(f"sidekey inject: {source}{where}: not valid YAML", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    for o in outcomes:
        print(f"{o.workload} {o.action} ({o.detail})", file=sys.stderr)
    if not outcomes:
        print(f"sidekey inject: {source}: no workloads found", file=sys.stderr)
    return 0
