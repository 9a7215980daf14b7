#!/usr/bin/env bash
# The local test stack: PostgreSQL and Synapse (with the bridge slot registrations), and the env
# file that Go tests and the demo read ($STACK_DIR/env: KEY=VALUE lines, no quotes, no export).
#
#   stack.sh up       Brings everything up (installs what is missing); fast when it already runs.
#   stack.sh down     Stops Synapse and the Postgres cluster.
#   stack.sh up|down synapse|postgres
#                     Starts (waiting until it answers) or stops only that part, as tests do to
#                     inject faults; `up PART` does not rewrite the env file.
#   stack.sh env      Prints the env file.
#   stack.sh status   Shows what runs.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")

write_env() {
	if write_if_changed "$STACK_ENV" <<EOF; then
UNWEDGE_HS_URL=http://127.0.0.1:$SYNAPSE_PORT
UNWEDGE_HS_DOMAIN=$SYNAPSE_SERVER_NAME
UNWEDGE_PG_URI=postgres://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DB?sslmode=disable
UNWEDGE_SLOTS_DIR=$SLOTS_DIR
UNWEDGE_SYNAPSE_LOG=$SYNAPSE_LOG
EOF
		log "wrote $STACK_ENV"
	fi
}

stop_postgres() {
	if pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
		log "stopping postgres"
		pg_ctlcluster "$PG_VERSION" main stop
	fi
}

usage() {
	echo "usage: $0 up [synapse|postgres] | down [synapse|postgres] | env | status" >&2
	exit 2
}

# The lock taken here is inherited by postgres.sh and synapse.sh (stack_lock exports
# UNWEDGE_STACK_LOCKED), so they do not wait for it again.
part=${2:-}
case ${1:-} in
up | down)
	[ $# -le 2 ] || usage
	case $part in "" | synapse | postgres) ;; *) usage ;; esac
	;;
esac

case ${1:-} in
up)
	need_root
	stack_lock
	case $part in
	synapse) bash "$here/synapse.sh" start ;;
	postgres) bash "$here/postgres.sh" ;;
	*)
		bash "$here/postgres.sh"
		bash "$here/synapse.sh" start
		write_env
		log "stack up: $STACK_ENV"
		;;
	esac
	;;
down)
	need_root
	stack_lock
	case $part in
	synapse) bash "$here/synapse.sh" stop ;;
	postgres) stop_postgres ;;
	*)
		bash "$here/synapse.sh" stop
		stop_postgres
		log "stack down"
		;;
	esac
	;;
env)
	[ -f "$STACK_ENV" ] || { echo "no $STACK_ENV: run $0 up" >&2; exit 1; }
	cat "$STACK_ENV"
	;;
status)
	rc=0
	if pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
		echo "postgres: up on $PG_HOST:$PG_PORT"
	else
		echo "postgres: down"
		rc=1
	fi
	if curl -fsS --max-time 2 -o /dev/null "http://127.0.0.1:$SYNAPSE_PORT/_matrix/client/versions" 2>/dev/null; then
		echo "synapse: up on 127.0.0.1:$SYNAPSE_PORT (pid $(cat "$STACK_DIR/synapse.pid" 2>/dev/null || echo '?'), log $SYNAPSE_LOG)"
	else
		echo "synapse: down"
		rc=1
	fi
	echo "slots: $(find "$SLOTS_DIR" -name registration.yaml 2>/dev/null | wc -l) in $SLOTS_DIR"
	if [ -f "$STACK_ENV" ]; then echo "env: $STACK_ENV"; else echo "env: missing"; fi
	exit $rc
	;;
*)
	usage
	;;
esac
