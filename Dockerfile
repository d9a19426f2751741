# sidekey's container image: a sidecar that holds API credentials for its app.
#
#   docker build -t sidekey:0.1.0 --build-arg SOURCE=$(git remote get-url origin) .
#
# Run it with a read-only root filesystem and one writable tmpfs/emptyDir at
# /run/sidekey (README.md, "Container image").
#
# BASE_IMAGE is the runtime; BUILDER_IMAGE (default: the same) builds the
# virtualenv that is copied into it, so both must have the same Python 3.11
# at the same path (a venv's interpreter is a symlink). For a distroless
# runtime, e.g. BASE_IMAGE=gcr.io/distroless/python3-debian12 (python at
# /usr/bin/python3), use a Debian 12 builder with python3-venv installed.
# requirements.lock is made for CPython 3.11 (Debian bookworm's python3).
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BUILDER_IMAGE=${BASE_IMAGE}
# The image's version label. The build checks it against the package's own
# version (proxy/__init__.py), so a stale label fails the build.
ARG VERSION=0.1.0

FROM ${BUILDER_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1
WORKDIR /src
# The locked dependencies first (exact versions, hashes checked, wheels only),
# so this layer is reused while only sidekey's own code changes.
COPY requirements.lock ./
RUN python3 -m venv /opt/sidekey \
 && /opt/sidekey/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY addons ./addons
# The wheel, then installed without dependencies: everything it needs came
# from the lock above, nothing unpinned is resolved here. (VERSION is declared
# here, not above, so a new label does not rebuild the dependency layer.)
ARG VERSION
RUN /opt/sidekey/bin/pip wheel --no-deps --wheel-dir /src/dist . \
 && /opt/sidekey/bin/pip install --no-deps /src/dist/sidekey-*.whl \
 && test "$(/opt/sidekey/bin/sidekey --version)" = "sidekey ${VERSION}" \
 && mkdir -p /state/run/sidekey

FROM ${BASE_IMAGE}
ARG VERSION
# The repository the image was built from, e.g. $(git remote get-url origin).
ARG SOURCE=""
LABEL org.opencontainers.image.title="sidekey" \
      org.opencontainers.image.description="A credential-holding egress proxy for AI and data APIs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/sidekey /opt/sidekey
# Owned by sidekey's user for runtimes that copy a mount point's ownership
# into a fresh volume; made in the build stage so this stage needs no shell.
COPY --from=build --chown=10001:10001 /state/run/sidekey /run/sidekey
# Everything sidekey writes goes under /run/sidekey: mount a tmpfs (emptyDir)
# there and the root filesystem can be read-only. TMPDIR is where the minted
# leaf certificates are staged. Defaults listen on loopback only: a sidecar
# shares the pod's loopback with its app and must not serve the pod network.
ENV PATH=/opt/sidekey/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/run/sidekey \
    SIDEKEY_CERTS=/run/sidekey/certs \
    SIDEKEY_POLICIES=/etc/sidekey/policies.yaml \
    SIDEKEY_LISTEN=127.0.0.1:8080 \
    SIDEKEY_ADMIN=127.0.0.1:9090
WORKDIR /run/sidekey
# A numeric user (no passwd entry needed), so runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8080 9090 9091
ENTRYPOINT ["sidekey"]
CMD ["run"]
