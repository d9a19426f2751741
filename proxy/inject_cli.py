"""``sidekey inject``'s I/O: read the file, print the result and the report.
The decisions are in ``proxy.inject``."""

from __future__ import annotations

import argparse
import sys

import yaml

from proxy.inject import InjectError, inject_text
from proxy.sidecar import SidecarConfig


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
