"""Start-up failures a person can act on, and starting both listeners.

Every way ``sidekey run`` (or ``init``, ``ca``) can fail before it serves is
one ``StartupError`` subclass: a fixed message template filled with
non-secret fields (paths, flags, addresses) and an exit code. ``main`` catches
them once and prints one line on stderr; ``explain`` maps anything else to a
line naming only the exception's type, since its text may carry a secret (a
policy value, an addon's message). ``--debug-tracebacks`` (or
``SIDEKEY_DEBUG=1``) adds the traceback.

``start_listeners`` binds the proxy and the admin listener before either is
announced, so a second sidekey whose admin port is taken never logs "listening".
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from proxy.admin import AdminServer
    from proxy.policy import Policy
    from proxy.server import Sidekey

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class StartupError(Exception):
    """One line on stderr, then exit with ``exit_code``. Subclasses set
    ``template``; the fields filling it must never be secret values."""

    template: ClassVar[str] = "{reason}"
    exit_code: ClassVar[int] = 2  # a person must change something before it will start

    def __init__(self, **fields: object) -> None:
        self.fields = fields
        super().__init__(self.template.format(**fields))


class ListenerInUse(StartupError):
    template = "{host}:{port} is in use; pick another with {flag}"


class ListenerRefused(StartupError):
    template = "cannot listen on {host}:{port} ({reason}); pick another with {flag}"


class BadAddress(StartupError):
    template = "{flag}: expected HOST:PORT{alternative}, e.g. 127.0.0.1:{port}"


class AdminNeedsToken(StartupError):
    template = (
        "the admin listener binds {host} (not loopback) only with an admin token:"
        " set SIDEKEY_ADMIN_TOKEN, or use --admin 127.0.0.1:PORT"
    )


class PodAdminNeedsToken(StartupError):
    template = (
        "inside a pod the admin API requires a token even on loopback (the app containers share it):"
        " set SIDEKEY_ADMIN_TOKEN, or --admin off"
    )


class BadChoice(StartupError):
    template = "{name}: expected one of {choices}"


class BadLogLevel(StartupError):
    template = "--log-level (or $SIDEKEY_LOG_LEVEL): expected one of " + ", ".join(LOG_LEVELS)


class PolicyNotFound(StartupError):
    template = "no policy file: looked for {searched}; create one with `sidekey init`, or pass --policies FILE"


class PolicyUnreadable(StartupError):
    template = "{path}: cannot read the policy ({reason})"


class PolicyInvalid(StartupError):
    # PolicyError's text: one "file:line: field: what was expected" line per
    # problem, values never quoted (the loader's own guarantee).
    template = "{problems}"


class CAUnusable(StartupError):
    template = "{reason}"  # CAError's text: paths and modes only


class AddonUnloadable(StartupError):
    template = "addon {spec}: cannot load it ({kind}); rerun with --debug-tracebacks to see why"


class DeadLetterFileUnusable(StartupError):
    template = "dead-letter file {path}: {reason}"


class CannotWrite(StartupError):
    template = "{path}: cannot write ({reason})"


class InitRefused(StartupError):
    template = "{path} already exists; sidekey init never overwrites (remove it, or pass another DIR)"


class Unexpected(StartupError):
    template = "unexpected {kind}; rerun with --debug-tracebacks (or SIDEKEY_DEBUG=1) to see the traceback"
    exit_code = 1  # a bug or an unforeseen environment, not a setting to fix


def explain(exc: BaseException) -> StartupError:
    """The one line for any exception that ended a command. Only our own
    templates are trusted with text; anything else is named by its type."""
    from proxy.certs import CAError  # here: `sidekey --version` need not load cryptography

    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, CAError):
        return CAUnusable(reason=str(exc))
    return Unexpected(kind=type(exc).__name__)


def log_level(value: str) -> int:
    name = value.strip().upper()
    if name not in LOG_LEVELS:
        raise BadLogLevel()
    return logging.getLevelNamesMapping()[name]


def load_policy(path: str) -> Policy:
    """The policy ``run`` starts with, or a StartupError naming the file."""
    from proxy.policy.load import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as err:
        raise PolicyInvalid(problems=err) from None
    except OSError as err:
        raise PolicyUnreadable(path=path, reason=err.strerror or type(err).__name__) from None


# errno -> why a bind failed, in words; anything else is named by its errno.
_BIND_REASONS = {
    errno.EACCES: "permission denied; ports below 1024 need privileges",
    errno.EADDRNOTAVAIL: "no such address on this machine",
}


def listener_failure(err: OSError, host: str, port: int, flag: str) -> StartupError:
    """The line for a listener that could not bind (``flag`` names the option to change)."""
    if err.errno == errno.EADDRINUSE:
        return ListenerInUse(host=host, port=port, flag=flag)
    if isinstance(err, socket.gaierror):
        reason = "cannot resolve the host name"
    else:
        reason = _BIND_REASONS.get(err.errno or 0) or errno.errorcode.get(err.errno or 0, type(err).__name__)
    return ListenerRefused(host=host, port=port, reason=reason, flag=flag)


async def start_listeners(
    engine: Sidekey, admin: AdminServer | None, scrape: AdminServer | None = None
) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """Prepare the engine, bind its listener, then the admin one and the
    metrics one, announcing none: the caller announces once all are bound, so
    addons never see ``running`` and no "listening" line appears for a sidekey
    that is about to exit. On any failure what was bound is closed again and
    the error propagates (a listener's OSError as a one-line StartupError
    naming the flag to change). Returns the admin and metrics addresses."""
    started: list[AdminServer] = []
    try:
        await engine.prepare()
        try:
            await engine.bind()
        except OSError as err:
            raise listener_failure(err, *engine.listen, "--listen") from None
        addresses: list[tuple[str, int] | None] = []
        for server, flag in ((admin, "--admin"), (scrape, "--metrics-listen")):
            if server is None:
                addresses.append(None)
                continue
            try:
                addresses.append(await server.start())
            except OSError as err:
                raise listener_failure(err, server.host, server.port, flag) from None
            started.append(server)
        return addresses[0], addresses[1]
    except BaseException:
        for server in started:
            await server.close()
        await engine.close_unstarted()
        raise
