#!/bin/sh
# The official postgres image's first start, in short: initdb with POSTGRES_USER as the
# superuser and POSTGRES_PASSWORD (scram-sha-256 everywhere), create POSTGRES_DB, then run the
# server on every interface.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  password_file=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" > "$password_file"
  # UTF8 as in the official image: without a locale initdb picks SQL_ASCII, where psycopg
  # returns text as bytes (SQLAlchemy then fails to read the server's version)
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$password_file" --auth=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8
  rm -f "$password_file"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
  PGPASSWORD="$POSTGRES_PASSWORD" createdb -U "$POSTGRES_USER" "$POSTGRES_DB"
  pg_ctl -D "$PGDATA" -m fast -w stop
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
