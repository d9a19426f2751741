"""``sidekey check``: validate a policy file, report the secrets it cannot read
here, and diff it against a running sidekey. ``load_or_report`` is shared
with ``sidekey run``."""

from __future__ import annotations

import os
import sys

from proxy.policy import Policy


def load_or_report(path: str) -> Policy | None:
    """The policy, or None after printing why not (file, line, field)."""
    from proxy.policy.load import PolicyError, load_policy

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
    from proxy.policy import SCHEMA_VERSION, STATIC_KINDS
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
    # Secret stores and token endpoints are read by the running sidekey, not here.
    static = [(who, ref) for who, ref in secret_uses(policy) if ref.kind in STATIC_KINDS]
    unreadable = [(who, ref, problem) for who, ref in static if (problem := read_secret(ref)[1])]
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
    from proxy.policy.diff import diff_providers

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
