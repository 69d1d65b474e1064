# The varstack database: the official PostgreSQL image with the schema as its init script.
#
# The image's own entrypoint does the rest of the original's contract: POSTGRES_PASSWORD and
# POSTGRES_DB on first start, every /docker-entrypoint-initdb.d/*.sql run once on an empty
# PGDATA, and PostgreSQL itself run as the unprivileged `postgres` user (the entrypoint starts
# as root only to own the data volume, then drops privileges), so no USER line here.
# The base is a build argument so the podman end-to-end test can pass a local stand-in.
ARG POSTGRES_IMAGE=postgres:16.6-bookworm
FROM ${POSTGRES_IMAGE}

COPY sql/ /docker-entrypoint-initdb.d/

EXPOSE 5432
# TCP on 127.0.0.1, not the socket: while the entrypoint initialises a new cluster its
# temporary server listens on the socket only and must not count as healthy.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=5 \
    CMD ["sh", "-c", "pg_isready -q -h 127.0.0.1 -U \"${POSTGRES_USER:-postgres}\" -d \"${POSTGRES_DB:-postgres}\""]
