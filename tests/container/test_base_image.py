"""Where the test base image's debootstrap gets Debian from: apt's own sources."""

from __future__ import annotations

import pytest

from tests.container.base_image import debian_mirror

DEB822 = """\
Types: deb
URIs: http://mirror.test/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.test/debian-security
Suites: bookworm-security
"""


@pytest.mark.parametrize(
    ("sources", "mirror"),
    [
        (DEB822, "http://mirror.test/debian"),
        # the security archive alone is no base for debootstrap
        ("URIs: http://mirror.test/debian-security\n", None),
        ("deb http://mirror.test/debian/ bookworm main\n", "http://mirror.test/debian/"),
        (
            "deb [signed-by=/usr/share/keyrings/k.gpg] https://mirror.test/debian bookworm main\n",
            "https://mirror.test/debian",
        ),
        # third-party repositories are skipped, commented lines too
        ("deb https://vendor.test/apt cloud-sdk-bookworm main\n# deb http://old.test/debian bookworm main\n", None),
        ("", None),
    ],
)
def test_debian_mirror(sources: str, mirror: str | None) -> None:
    assert debian_mirror(sources) == mirror
