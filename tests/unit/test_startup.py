"""Start-up decisions without I/O: where the policy and CA are looked for,
which line a failure becomes, and the starter policy ``sidekey init`` writes."""

from __future__ import annotations

import errno
import logging
import re
import socket
from pathlib import Path

import pytest

from proxy import init_cmd, locate, startup
from proxy.certs import CAError
from proxy.policy.load import parse_policy

HOME = Path("/home/u")


# -- the config dir ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "expected", "source"),
    [
        ({}, "/home/u/.config/sidekey", "~/.config"),
        ({"XDG_CONFIG_HOME": "/xdg"}, "/xdg/sidekey", "$XDG_CONFIG_HOME"),
        ({"XDG_CONFIG_HOME": "relative/xdg"}, "/home/u/.config/sidekey", "~/.config"),  # the XDG spec: ignored
        ({"XDG_CONFIG_HOME": "/xdg", "SIDEKEY_HOME": "/sk"}, "/sk", "$SIDEKEY_HOME"),
        ({"SIDEKEY_HOME": ""}, "/home/u/.config/sidekey", "~/.config"),  # set but empty: as if unset
    ],
)
def test_config_dir(env: dict[str, str], expected: str, source: str) -> None:
    assert locate.config_dir(env, HOME) == locate.ConfigDir(Path(expected), source)


# -- the policy lookup order --------------------------------------------------------
CONFIG = locate.ConfigDir(Path("/cfg"), "$SIDEKEY_HOME")
LOCAL, IN_CONFIG = Path("policies.yaml"), Path("/cfg/policies.yaml")


@pytest.mark.parametrize(
    ("flag", "env", "present", "path", "found_by", "certs"),
    [
        ("/p/mine.yaml", {"SIDEKEY_POLICIES": "/e.yaml"}, {LOCAL, IN_CONFIG}, "/p/mine.yaml", "--policies", "certs"),
        (None, {"SIDEKEY_POLICIES": "/e.yaml"}, {LOCAL, IN_CONFIG}, "/e.yaml", "$SIDEKEY_POLICIES", "certs"),
        (None, {}, {LOCAL, IN_CONFIG}, "policies.yaml", "./policies.yaml", "certs"),
        (None, {}, {IN_CONFIG}, "/cfg/policies.yaml", "the config dir, $SIDEKEY_HOME", "/cfg/certs"),
        # Named explicitly, a policy in the config dir still brings the config dir's CA.
        ("/cfg/policies.yaml", {}, set(), "/cfg/policies.yaml", "--policies", "/cfg/certs"),
        (
            None,
            {"SIDEKEY_POLICIES": "/cfg/policies.yaml"},
            set(),
            "/cfg/policies.yaml",
            "$SIDEKEY_POLICIES",
            "/cfg/certs",
        ),
        # An explicit file is taken even when missing: reading it names the path.
        ("/missing.yaml", {}, {IN_CONFIG}, "/missing.yaml", "--policies", "certs"),
    ],
)
def test_policy_lookup_order(
    flag: str | None, env: dict[str, str], present: set[Path], path: str, found_by: str, certs: str
) -> None:
    found = locate.locate_policy(flag, env, CONFIG, present.__contains__)
    assert found == locate.PolicyLocation(Path(path), found_by, Path(certs))


def test_no_policy_anywhere_names_both_places_and_init() -> None:
    with pytest.raises(startup.PolicyNotFound) as err:
        locate.locate_policy(None, {}, CONFIG, lambda _p: False)
    assert str(err.value) == (
        "no policy file: looked for ./policies.yaml and /cfg/policies.yaml;"
        " create one with `sidekey init`, or pass --policies FILE"
    )


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("/flag", {"SIDEKEY_CERTS": "/env"}, "/flag"),
        (None, {"SIDEKEY_CERTS": "/env"}, "/env"),
        (None, {}, "/cfg/certs"),
    ],
)
def test_certs_flag_and_env_beat_the_config_dir(flag: str | None, env: dict[str, str], expected: str) -> None:
    location = locate.PolicyLocation(IN_CONFIG, "the config dir, $SIDEKEY_HOME", Path("/cfg/certs"))
    assert locate.certs_dir(flag, env, location) == Path(expected)


def test_ca_command_uses_the_ca_run_would_use() -> None:
    env = {"SIDEKEY_HOME": "/cfg"}
    assert locate.ca_dir_for_ca_command(None, env, HOME, {IN_CONFIG}.__contains__) == Path("/cfg/certs")
    assert locate.ca_dir_for_ca_command(None, env, HOME, {LOCAL, IN_CONFIG}.__contains__) == Path("certs")
    assert locate.ca_dir_for_ca_command(None, env, HOME, lambda _p: False) == Path("certs")  # as before: ./certs


# -- which line a failure becomes -----------------------------------------------------------
@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (OSError(errno.EADDRINUSE, "Address already in use"), "127.0.0.1:8080 is in use; pick another with --listen"),
        (
            PermissionError(errno.EACCES, "Permission denied"),
            "cannot listen on 127.0.0.1:8080 (permission denied; ports below 1024 need privileges);"
            " pick another with --listen",
        ),
        (
            OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"),
            "cannot listen on 127.0.0.1:8080 (no such address on this machine); pick another with --listen",
        ),
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "cannot listen on 127.0.0.1:8080 (cannot resolve the host name); pick another with --listen",
        ),
        (
            OSError(errno.EINVAL, "Invalid argument"),
            "cannot listen on 127.0.0.1:8080 (EINVAL); pick another with --listen",
        ),
    ],
)
def test_listener_failures(err: OSError, expected: str) -> None:
    failure = startup.listener_failure(err, "127.0.0.1", 8080, "--listen")
    assert str(failure) == expected
    assert failure.exit_code == 2


def test_unexpected_exceptions_are_named_by_type_never_by_text() -> None:
    failure = startup.explain(RuntimeError("sk-live-SECRET-in-a-message"))
    assert isinstance(failure, startup.Unexpected)
    assert str(failure) == (
        "unexpected RuntimeError; rerun with --debug-tracebacks (or SIDEKEY_DEBUG=1) to see the traceback"
    )
    assert failure.exit_code == 1


def test_our_own_errors_keep_their_line() -> None:
    mine = startup.ListenerInUse(host="127.0.0.1", port=1, flag="--admin")
    assert startup.explain(mine) is mine
    ca = startup.explain(
        CAError("CA key /c/k.pem is accessible by group or others (mode 0644); run: chmod 600 /c/k.pem")
    )
    assert str(ca).endswith("run: chmod 600 /c/k.pem") and ca.exit_code == 2


def test_every_message_is_one_line() -> None:
    fields = {"host": "h", "port": 1, "flag": "--f", "reason": "r", "alternative": "", "searched": "s", "path": "p"}
    fields |= {"spec": "m", "kind": "K", "name": "--n", "choices": "a, b", "workers": 2, "what": "w"}
    for kind in startup.StartupError.__subclasses__():
        if kind is startup.PolicyInvalid:  # the loader's lines, one per problem
            continue
        assert "\n" not in str(kind(**fields)), kind


@pytest.mark.parametrize(
    ("given", "level"), [("debug", logging.DEBUG), ("INFO", logging.INFO), (" Warning ", logging.WARNING)]
)
def test_log_levels(given: str, level: int) -> None:
    assert startup.log_level(given) == level


@pytest.mark.parametrize("given", ["loud", "", "WARN", "NOTSET", "10"])
def test_bad_log_level_lists_the_valid_ones(given: str) -> None:
    with pytest.raises(startup.BadLogLevel) as err:
        startup.log_level(given)
    assert str(err.value).endswith("expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL")


# -- the starter policy -------------------------------------------------------------
def test_starter_policy_is_a_working_policy() -> None:
    policy = parse_policy(init_cmd.starter_policy(), "starter")
    assert [p.name for p in policy.providers] == ["openai", "anthropic", "groq"]
    assert init_cmd.parse_secret_names(init_cmd.starter_policy()) == [
        "ANTHROPIC_API_KEY",
        "GROQ_API_KEY",
        "OPENAI_API_KEY",
    ]


def test_starter_policy_commented_examples_parse_when_uncommented() -> None:
    # A commented line whose text is YAML (a key or a list item) under a
    # provider is an example; prose comments start with a capital or sit at
    # the top level.
    example = re.compile(r"^(\s+)# ?(\s*(?:- |[a-z_][a-z0-9_-]*:).*)$")
    text = init_cmd.starter_policy().decode()
    lines = [m.group(1) + m.group(2) if (m := example.match(line)) else line for line in text.splitlines()]
    policy = parse_policy("\n".join(lines), "uncommented")
    names = [p.name for p in policy.providers]
    assert names == ["openai", "anthropic", "groq", "airtable", "databricks", "internal"]
    assert [t.name for t in policy.providers[0].targets] == ["key-a", "key-b"]
