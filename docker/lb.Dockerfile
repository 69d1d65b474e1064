# The varstack balancer: `python -m lb` on port 3000 (admin on 127.0.0.1:8404 inside).
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

# The same dependency layer as service.Dockerfile, instruction for instruction, so a builder
# builds it once and both images share it.
COPY pyproject.toml ./
RUN python3 -m venv /opt/venv \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY docker/healthcheck.py /usr/local/bin/varstack-healthcheck
COPY common/ ./common/
COPY lb/ ./lb/

# Numeric so it needs no /etc/passwd entry on any base; nothing under /app is writable by it.
USER 10001:10001
EXPOSE 3000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/bin/varstack-healthcheck", "lb"]
# Exec form: python is PID 1 and receives SIGTERM itself (it drains, then exits).
CMD ["python", "-m", "lb"]
