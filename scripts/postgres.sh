#!/usr/bin/env bash
# Makes sure a PostgreSQL cluster ($PG_VERSION/main) runs on $PG_HOST:$PG_PORT with the project's
# role (LOGIN, CREATEDB: tests create a database each) and database.
# Idempotent: a running, configured cluster with the role and database is left as it is.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
need_root
stack_lock

apt_install postgresql

cluster_status() { pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {print $4}'; }

if [ -z "$(cluster_status)" ]; then
	log "creating postgres cluster $PG_VERSION/main"
	pg_createcluster "$PG_VERSION" main -p "$PG_PORT" >/dev/null
fi

# This cluster only ever holds throwaway test data, so durability is traded for speed: no fsync,
# no synchronous commit, no full-page writes. Never copy these settings to a real server.
conf=/etc/postgresql/$PG_VERSION/main/conf.d/unwedge.conf
mkdir -p "$(dirname "$conf")"
if write_if_changed "$conf" <<EOF; then
# Written by unwedge scripts/postgres.sh. Test-only cluster: speed over durability, and room for
# several bridges (each with its own connection pool) at once.
listen_addresses = '$PG_HOST'
port = $PG_PORT
max_connections = 500
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
	if [ "$(cluster_status)" = online ]; then
		log "postgres settings changed: restarting"
		pg_ctlcluster "$PG_VERSION" main stop
	fi
fi

if [ "$(cluster_status)" != online ]; then
	log "starting postgres $PG_VERSION/main"
	pg_ctlcluster "$PG_VERSION" main start 9>&-
fi
for _ in $(seq 1 120); do
	pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && break
	sleep 0.5
done
pg_isready -q -h "$PG_HOST" -p "$PG_PORT" || {
	echo "postgres does not accept connections on $PG_HOST:$PG_PORT" >&2
	tail -20 "/var/log/postgresql/postgresql-$PG_VERSION-main.log" >&2 || true
	exit 1
}

psql_admin() { runuser -u postgres -- psql -X -p "$PG_PORT" -v ON_ERROR_STOP=1 -qtA "$@"; }

# The role: created once; fixed up only when it cannot log in with the password or lacks a right.
role=$(psql_admin -c "SELECT rolcanlogin AND rolcreatedb FROM pg_roles WHERE rolname = '$PG_USER'")
if [ -z "$role" ]; then
	log "creating postgres role $PG_USER"
	psql_admin -c "CREATE ROLE \"$PG_USER\" LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
elif [ "$role" != t ] || ! PGPASSWORD=$PG_PASSWORD psql -X -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -qtAc 'SELECT 1' >/dev/null 2>&1; then
	log "fixing postgres role $PG_USER"
	psql_admin -c "ALTER ROLE \"$PG_USER\" LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
fi
if [ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" ]; then
	log "creating postgres database $PG_DB"
	psql_admin -c "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_USER\""
fi
log "postgres ready on $PG_HOST:$PG_PORT"
