# The varstack API replica: `python -m services` on port 5000.
#
# The base image is a build argument: users get the official image (pinned); the podman
# end-to-end test passes a locally built stand-in because no registry is reachable there.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Build-time only: the path of a CA bundle the builder mounts for pip behind a TLS-inspecting
# proxy (pip reads PIP_CERT itself). A path, never a certificate, and not kept in the image.
ARG PIP_CERT

WORKDIR /app

# Dependencies in their own layer, keyed on pyproject.toml alone: a code change does not
# reinstall them. The list is read from pyproject so it is never written twice.
COPY pyproject.toml ./
RUN python3 -m venv /opt/venv \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY docker/healthcheck.py /usr/local/bin/varstack-healthcheck
COPY common/ ./common/
COPY services/ ./services/
# Where the wheel puts it (pyproject force-include), so the service finds its schema.
COPY sql/schema.sql ./services/schema.sql

# Numeric so it needs no /etc/passwd entry on any base; nothing under /app is writable by it.
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "/usr/local/bin/varstack-healthcheck", "service"]
# Exec form: python is PID 1 and receives SIGTERM itself (it drains, then exits 0).
CMD ["python", "-m", "services"]
