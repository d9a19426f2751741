"""Fuzz the policy loader: YAML bytes in, either a Policy or a PolicyError out.

``PolicyError`` is the only allowed failure, and it must carry at least one problem,
each with a 1-based line and a field path (what ``sidekey check`` prints). Any other
exception is a crash. ``parse_policy`` is the text entry point under ``load_policy``
(which only reads the file); relative paths resolve against an empty temporary
directory, so a policy naming a CA bundle gets a line-numbered "not found" problem.

    python fuzz/policy_fuzz.py -atheris_runs=5000 /tmp/new fuzz/corpus/policy
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

# Coverage from sidekey's own modules only: instrumenting PyYAML too made each input
# ~3x slower and start-up ~10 s longer, and what matters here is how the loader
# handles what YAML hands it (PyYAML's own errors end in one except clause).
with atheris.instrument_imports(include=["proxy"]):
    from proxy.policy.load import PolicyError, parse_policy

_BASE = Path(tempfile.mkdtemp(prefix="sidekey-policy-fuzz-"))


def test_one_input(data: bytes) -> None:
    try:
        parse_policy(data, "policies.yaml", _BASE)
    except PolicyError as err:
        if not err.problems:
            raise AssertionError("PolicyError without a problem") from None
        try:  # YAML also ends lines at CR, NEL, LS and PS; str.splitlines() counts those and more
            lines = len(data.decode("utf-8").splitlines()) + 2  # +2: a problem may point past the end
        except UnicodeDecodeError:
            lines = data.count(b"\n") + 2
        for problem in err.problems:
            if not (1 <= problem.line <= lines and problem.field and problem.message):
                raise AssertionError("a problem without a line in the file, a field or a message") from None


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
