"""A Debian 12 base image made on this machine, for building sidekey's Dockerfile.

No container registry is reachable where the tests run, so ``python:3.11-slim``
cannot be pulled. Instead debootstrap makes a bookworm rootfs with python3
(3.11, the version requirements.lock is made for) from the mirror apt already
uses, and podman imports it as a local image. The rootfs tarball is cached
(``$XDG_CACHE_HOME/sidekey-test``, keyed by the recipe), and the imported image
stays in podman's store, so only the first run on a machine pays for debootstrap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
# python3-venv: the Dockerfile's build stage makes a virtualenv (the runtime
# stage gets the same base, as BUILDER_IMAGE defaults to BASE_IMAGE).
PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Not needed in an image: downloaded .debs, apt lists, docs (~110 MB).
TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale")
IMAGE = "localhost/sidekey-test-base"


def recipe_key() -> str:
    """Names one base rootfs: a change to the recipe makes a new one."""
    recipe = f"{SUITE} minbase {' '.join(PACKAGES)} trim {' '.join(TRIM)}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def debian_mirror(sources: str) -> str | None:
    """The Debian archive URI of apt's sources (deb822 ``.sources`` or one-line
    ``sources.list`` text), skipping the security archive; None if there is none."""
    uris = re.findall(r"^URIs:\s*(\S+)", sources, flags=re.MULTILINE)
    uris += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", sources, flags=re.MULTILINE)
    for uri in uris:
        if uri.rstrip("/").endswith("/debian"):
            return str(uri)
    return None


def apt_sources_text(root: Path = Path("/etc/apt")) -> str:
    parts = [root / "sources.list", *sorted((root / "sources.list.d").glob("*"))]
    return "\n".join(p.read_text(errors="replace") for p in parts if p.is_file())


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "sidekey-test"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One debootstrap at a time per machine (parallel test runs share the cache)."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _debootstrap(tarball: Path, mirror: str, log: Path) -> None:
    with tempfile.TemporaryDirectory(dir=tarball.parent, prefix="rootfs-") as tmp:
        root = Path(tmp) / "root"
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror]
        with open(log, "wb") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap exited {done.returncode}; its log: {log}")
        for rel in TRIM:
            shutil.rmtree(root / rel, ignore_errors=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=300)
        partial.replace(tarball)


def ensure_base_image(podman: list[str]) -> str:
    """The local base image's name, importing (and first making) its rootfs as needed."""
    key = recipe_key()
    image = f"{IMAGE}:{key}"
    if subprocess.run([*podman, "image", "exists", image], check=False).returncode == 0:
        return image
    cache = cache_dir()
    tarball = cache / f"base-{key}.tar"
    with _locked(cache / "base.lock"):
        if not tarball.exists():
            mirror = debian_mirror(apt_sources_text())
            if mirror is None:
                raise RuntimeError("no Debian mirror in /etc/apt/sources.list*: cannot debootstrap the base image")
            _debootstrap(tarball, mirror, cache / f"debootstrap-{key}.log")
        subprocess.run(
            [*podman, "import", "--quiet", str(tarball), image], check=True, capture_output=True, timeout=300
        )
    return image
