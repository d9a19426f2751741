"""``sidekey init [DIR]``: a starter policy and a CA for a machine without a checkout.

Writes ``DIR/policies.yaml`` (the commented starter shipped in this package)
and the CA in ``DIR/certs`` (key 0600, directories 0700), then prints the
three commands that follow: trust the CA, export HTTPS_PROXY, run. It never
overwrites: an existing policy or CA file stops it before anything is written.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from proxy.certs import CA_CERT_NAME, CA_KEY_NAME, CertificateAuthority
from proxy.locate import CERTS_NAME, POLICY_NAME, config_dir
from proxy.policy.load import parse_policy
from proxy.startup import CannotWrite, InitRefused

STARTER = "starter_policy.yaml"


def starter_policy() -> bytes:
    return resources.files("proxy").joinpath(STARTER).read_bytes()


def init(target: str | None, env: Mapping[str, str], home: Path) -> str:
    """Write the starter policy and the CA; return the text telling what next."""
    default = config_dir(env, home).path
    # Absolute: the printed commands must work from any directory.
    directory = Path(os.path.abspath(target or default))
    policy_path, certs = directory / POLICY_NAME, directory / CERTS_NAME
    for path in (policy_path, certs / CA_CERT_NAME, certs / CA_KEY_NAME):
        if path.exists():
            raise InitRefused(path=path)
    text = starter_policy()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: a policy written meanwhile by someone else is never replaced.
        fd = os.open(policy_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(text)
    except OSError as err:  # strerror is the OS's fixed text
        raise CannotWrite(path=err.filename or policy_path, reason=err.strerror or type(err).__name__) from None
    try:
        CertificateAuthority.load_or_create(certs)  # certs/ 0700, key 0600 with O_EXCL
    except BaseException:
        policy_path.unlink()  # all or nothing: a rerun must not find half a set-up
        raise
    same_as_default = directory == Path(os.path.abspath(default))
    return next_steps(directory, certs, parse_secret_names(text), same_as_default, env)


def parse_secret_names(text: bytes) -> list[str]:
    """The environment variables the starter policy reads its keys from."""
    policy = parse_policy(text, STARTER)
    refs = (p.auth.secret for p in policy.providers)
    return sorted({ref.ref for ref in refs if ref is not None and ref.kind == "env"})


def next_steps(directory: Path, certs: Path, secrets: list[str], found_by_default: bool, env: Mapping[str, str]) -> str:
    q = shlex.quote
    bundle = directory / "ca-bundle.pem"
    listen = env.get("SIDEKEY_LISTEN") or "127.0.0.1:8080"
    run = "sidekey run" if found_by_default else f"SIDEKEY_HOME={q(str(directory))} sidekey run"
    return f"""\
wrote {directory / POLICY_NAME} (a starter policy: edit it to add providers)
wrote the CA in {certs} ({CA_KEY_NAME} is its private key, mode 0600: keep it there)

Next:
  1. trust sidekey's CA in the apps' shell (a bundle of the system CAs plus sidekey's;
     `sidekey ca --certs {q(str(certs))}` shows Node and curl too):
       sidekey ca --certs {q(str(certs))} --bundle {q(str(bundle))} && export SSL_CERT_FILE={q(str(bundle))}
  2. send the apps through sidekey:
       export HTTPS_PROXY=http://{listen}
  3. run sidekey in its own terminal, with the real keys in its environment
     ({", ".join(secrets)}):
       {run}
"""
