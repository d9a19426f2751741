"""Where ``sidekey`` finds its policy and CA when no flag says so.

A checkout has ``policies.yaml`` and ``certs/`` in the working directory; a
``pip install sidekey`` has neither, so ``sidekey init`` writes both into a
config directory (``$SIDEKEY_HOME``, else ``$XDG_CONFIG_HOME/sidekey``, else
``~/.config/sidekey``). The policy is looked for in this order:

1. ``--policies FILE``
2. ``$SIDEKEY_POLICIES``
3. ``./policies.yaml``
4. ``<config dir>/policies.yaml``

The CA directory is ``--certs`` or ``$SIDEKEY_CERTS`` when given; otherwise
the ``certs`` directory beside a policy that lives in the config dir (so the
CA ``sidekey init`` wrote is the one served), else ``./certs`` as before.

Pure: the environment, home and an ``exists`` check are passed in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from proxy.startup import PolicyNotFound

POLICY_NAME = "policies.yaml"
CERTS_NAME = "certs"


@dataclass(frozen=True, slots=True)
class ConfigDir:
    path: Path
    source: str  # what chose it: "$SIDEKEY_HOME", "$XDG_CONFIG_HOME" or "~/.config"


@dataclass(frozen=True, slots=True)
class PolicyLocation:
    path: Path
    found_by: str  # "--policies", "$SIDEKEY_POLICIES", "./policies.yaml", "the config dir, $SIDEKEY_HOME"
    certs: Path  # the CA directory unless --certs / $SIDEKEY_CERTS say otherwise


def config_dir(env: Mapping[str, str], home: Path) -> ConfigDir:
    if env.get("SIDEKEY_HOME"):
        return ConfigDir(Path(env["SIDEKEY_HOME"]), "$SIDEKEY_HOME")
    xdg = env.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is invalid and ignored
        return ConfigDir(Path(xdg) / "sidekey", "$XDG_CONFIG_HOME")
    return ConfigDir(home / ".config" / "sidekey", "~/.config")


def _certs_for(policy: Path, config: ConfigDir) -> Path:
    # abspath, not resolve(): a pure comparison of the two names as given.
    if Path(os.path.abspath(policy)).parent == Path(os.path.abspath(config.path)):
        return config.path / CERTS_NAME
    return Path(CERTS_NAME)


def locate_policy(
    flag: str | None, env: Mapping[str, str], config: ConfigDir, exists: Callable[[Path], bool]
) -> PolicyLocation:
    """The policy to load and how it was found; PolicyNotFound lists where we looked.
    An explicit flag or variable is taken as given (a missing file is reported
    when it is read, naming that path)."""
    if flag:
        path = Path(flag)
        return PolicyLocation(path, "--policies", _certs_for(path, config))
    if env.get("SIDEKEY_POLICIES"):
        path = Path(env["SIDEKEY_POLICIES"])
        return PolicyLocation(path, "$SIDEKEY_POLICIES", _certs_for(path, config))
    local = Path(POLICY_NAME)
    if exists(local):
        return PolicyLocation(local, f"./{POLICY_NAME}", Path(CERTS_NAME))
    configured = config.path / POLICY_NAME
    if exists(configured):
        return PolicyLocation(configured, f"the config dir, {config.source}", config.path / CERTS_NAME)
    raise PolicyNotFound(searched=f"./{POLICY_NAME} and {configured}")


def certs_dir(flag: str | None, env: Mapping[str, str], location: PolicyLocation | None) -> Path:
    """``--certs``, else ``$SIDEKEY_CERTS``, else where the policy's location says."""
    if flag:
        return Path(flag)
    if env.get("SIDEKEY_CERTS"):
        return Path(env["SIDEKEY_CERTS"])
    return location.certs if location is not None else Path(CERTS_NAME)


def ca_dir_for_ca_command(flag: str | None, env: Mapping[str, str], home: Path, exists: Callable[[Path], bool]) -> Path:
    """``sidekey ca`` shows the CA that ``sidekey run`` would serve from here."""
    try:
        location: PolicyLocation | None = locate_policy(None, env, config_dir(env, home), exists)
    except PolicyNotFound:
        location = None
    return certs_dir(flag, env, location)
