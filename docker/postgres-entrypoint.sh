#!/bin/sh
# First start: initdb with the password from the environment, the role and database POSTGRES_* name, then the
# init scripts; every start: postgres on all interfaces of the container (the compose network only: never published).
set -e
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_DB:=$POSTGRES_USER}"
mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp); printf '%s' "$POSTGRES_PASSWORD" > "$pwfile"; chown postgres "$pwfile"
  gosu postgres initdb -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  gosu postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [ "$POSTGRES_DB" != "postgres" ]; then
    gosu postgres psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE \"$POSTGRES_DB\";" >/dev/null
  fi
  for f in /docker-entrypoint-initdb.d/*.sh; do
    [ -e "$f" ] || continue
    echo "postgres-entrypoint: running $f"
    PGHOST=/run/postgresql gosu postgres env POSTGRES_USER="$POSTGRES_USER" POSTGRES_DB="$POSTGRES_DB" sh "$f"
  done
  gosu postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec gosu postgres postgres -D "$PGDATA" -c listen_addresses='*'
