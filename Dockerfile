# syntax=docker/dockerfile:1
# One image for the operator (`bmad operator run`, the default) and the agent runtime
# (`bmad runtime`, which the operator sets as the agent pods' args).
#
#   docker build -t bmad-operator:0.1.0 .
#
# BASE_IMAGE is any Debian-like image with Python 3.11 as `python`, a venv module and
# useradd. The default is pinned by digest (a multi-arch index of python:3.11-slim), so
# a rebuild gets the same base until someone changes this line on purpose. Without a
# registry, `bmad testbed image` builds a base from Debian packages (mmdebstrap) and
# builds this file with buildah against it, offline: it passes PIP_NO_INDEX=1 and
# PIP_FIND_LINKS=<a wheelhouse mounted into the build>.
ARG BASE_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# --- builder: install the project and its dependencies into a venv ------------------
FROM ${BASE_IMAGE} AS builder

# Unset unless given: pip then uses PyPI as usual.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The dependencies first, exactly as locked: every version pinned and every file checked
# against its sha256 (requirements/image.lock, made by pip-compile --generate-hashes;
# see docs/development.md). A file that does not match fails the build.
COPY requirements/image.lock requirements/image.lock
RUN pip install --require-hashes --no-deps -r requirements/image.lock

# Everything pyproject.toml builds into the wheel (the component folders, the
# generated CRDs and the test bed scripts), nothing else.
COPY pyproject.toml README.md ./
COPY crds/ crds/
COPY integrations/ integrations/
COPY operator/ operator/
COPY runtime/ runtime/
COPY testbed/ testbed/
COPY cli/ cli/
# Only this tree's own wheel now (--no-deps): its dependencies are installed above.
# DL3013 (pin versions): the only unpinned name is that wheel, built just above.
# hadolint ignore=DL3013
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip install --no-deps --no-index --find-links /wheels bmad-operator \
    && pip check \
    && rm -rf /wheels

# --- final: the venv on a clean base, run as an unprivileged user --------------------
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="bmad-operator" \
      org.opencontainers.image.description="BMAD operator and agent runtime" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric uid, so that Kubernetes can check runAsNonRoot against the image.
RUN groupadd --gid 10001 bmad \
    && useradd --uid 10001 --gid 10001 --home-dir /home/bmad --create-home \
       --shell /usr/sbin/nologin bmad

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /home/bmad
USER 10001:10001

# 8080: health (operator) and HTTP API (runtime); 8081: operator metrics.
EXPOSE 8080 8081
# Liveness and readiness come from Kubernetes probes.
HEALTHCHECK NONE

ENTRYPOINT ["bmad"]
CMD ["operator", "run"]
