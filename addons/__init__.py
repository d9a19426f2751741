"""Built-in addons and the loader for operators' own.

An addon is one class in one file, with methods named after the hooks
declared in ``proxy.hooks`` (``SPECS``); what it offers others it lists in
``provides`` (``proxy.capabilities``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from addons.access_log import AccessLog
from addons.cache.addon import Cache
from addons.credentials import CredentialInjector
from addons.health import HealthChecks
from addons.limits import Limits
from addons.metrics import Metrics
from addons.placeholders import Placeholders
from addons.provider_headers import ProviderHeaders
from addons.signing import AwsSigner
from addons.usage import UsageMeter


def default_addons(*, access_log: bool = True) -> list[object]:
    addons: list[object] = [
        # Before credentials: it sees the caller's headers before their
        # credential headers are stripped (a placeholder there is refused or
        # put in like any other), and refuses a misdirected one before any work.
        Placeholders(),
        # Then: nothing else should ever see (or log) the caller's placeholder
        # key, and a missing secret answers before any other work is done.
        CredentialInjector(),
        # AWS SigV4 (auth type aws-sigv4): its request hook refuses a body too
        # large to sign before any limit is taken; its upstream_attempt hook
        # runs last of all, whatever the order here (runs_last).
        AwsSigner(),
        # After credentials: fills in provider-required headers the caller left out.
        ProviderHeaders(),
        # Budgets refuse before limits take anything; meters tokens and cost and
        # puts them in flow.metadata before the limits, metrics and audit
        # observers (later in this list) read them.
        UsageMeter(),
        # After the usage meter (a miss's recorder wraps its body observer,
        # and a stored entry keeps the cost it measured), before limits: a
        # hit or a coalesced follower never takes tokens or requests.
        Cache(),
        # Before anything upstream: over a limit, the request waits or gets 429
        # here. Its response/error hooks reconcile tokens from flow.metadata["usage"].
        Limits(),
        # Observer only (response/error): counts what the addons above decided.
        Metrics(),
        # No request hooks: background health checks, and alerts on the
        # engine's upstream state changes.
        HealthChecks(),
    ]
    if access_log:
        # Observer only, after the addons whose decisions it reports (limits'
        # refusals, the usage meter): one INFO line per finished request.
        addons.append(AccessLog())
    return addons


def load_addons(spec: str) -> list[object]:
    """``pkg.module``, ``pkg.module:Class`` or ``/path/to/file.py``.

    A module exposing ``addons = [...]`` (mitmproxy's convention) gives that
    list; ``module:Class`` instantiates the class with no arguments.
    """
    target, _, attr = spec.partition(":") if not spec.endswith(".py") else (spec, "", "")
    if target.endswith(".py"):
        path = Path(target)
        name = f"sidekey_user_addon_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load addon file {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if attr:
        return [getattr(module, attr)()]
    found = getattr(module, "addons", None)
    if not isinstance(found, list):
        raise ImportError(f"addon module {target} defines no 'addons' list; use module:Class")
    return found
