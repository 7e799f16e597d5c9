#!/bin/sh
# MLflow's tracking database beside Dagster's, owned by the user docker/.env names.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE mlflow OWNER \"$POSTGRES_USER\";"
