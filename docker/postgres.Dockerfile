# Postgres from Debian's own package, for hosts that cannot pull postgres:16 (docker/compose.debian-postgres.yaml
# selects it). It behaves as the official image does for this stack: POSTGRES_USER / POSTGRES_PASSWORD /
# POSTGRES_DB create the role and database on first start, *.sh in /docker-entrypoint-initdb.d run once
# (docker/initdb/mlflow.sh creates MLflow's database), data in /var/lib/postgresql/data, pg_isready for the
# health check. BASE: a Debian image (smoke.sh imports one made with debootstrap).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive PGDATA=/var/lib/postgresql/data
RUN apt-get update && apt-get install -y --no-install-recommends postgresql postgresql-client gosu \
    && rm -rf /var/lib/apt/lists/*
# the server's programs (initdb, pg_ctl, postgres) on the PATH, beside Debian's client wrappers
RUN for f in /usr/lib/postgresql/*/bin/*; do [ -e "/usr/bin/$(basename "$f")" ] || ln -s "$f" /usr/local/bin/; done
COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
RUN chmod +x /usr/local/bin/postgres-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
