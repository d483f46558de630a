# thpsplit: the collapser and remapper daemons and the thpctl client in one image.
#
#   docker build -t thpsplit .                      # on the official python:3.11-slim
#   docker build --build-arg BASE_IMAGE=thpsplit-base:bookworm \
#                --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt -t thpsplit .
#
# docker-compose.yml runs `collapsed`, `remapd` and the demo from this image; .ci/compose builds
# it on a locally made Debian base (no registry needed). Any base with python3 >= 3.11 and its
# venv module works: the project lives in its own venv at /opt/venv, first on PATH.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="thpsplit" \
      org.opencontainers.image.description="collapsed, remapd and thpctl: file THP collapse split in two actors"

# A CA bundle for pip where HTTPS to the package index is intercepted (optional; empty: pip's own).
ARG PIP_CERT=

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The venv and the project's dependencies first (taken from pyproject.toml), so that a change
# in the source reinstalls only the project itself, without the network.
COPY pyproject.toml /tmp/pyproject.toml
RUN set -eu; \
    if [ -z "${PIP_CERT}" ]; then unset PIP_CERT; fi; \
    python3 -m venv "$VIRTUAL_ENV"; \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt; \
    python -m pip install --upgrade "setuptools>=68" wheel -r /tmp/requirements.txt; \
    rm /tmp/pyproject.toml /tmp/requirements.txt

COPY . /src
RUN set -eu; \
    if [ -z "${PIP_CERT}" ]; then unset PIP_CERT; fi; \
    python -m pip install --no-build-isolation /src; \
    rm -rf /src; \
    groupadd --system --gid 10001 thpsplit; \
    useradd --system --create-home --home-dir /home/thpsplit --uid 10001 --gid thpsplit thpsplit

USER thpsplit
WORKDIR /home/thpsplit

# docker-compose.yml gives each service its own command; alone, the image shows the client's help.
CMD ["thpctl", "--help"]
