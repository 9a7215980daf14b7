#!/usr/bin/env bash
# The local test homeserver: Synapse from the chroot that install-synapse.sh builds, on
# 127.0.0.1:$SYNAPSE_PORT, with open registration, no rate limits and $SLOT_COUNT appservice slots
# for test bridges. Local testing only: never expose this configuration.
#
#   synapse.sh start [EXTRA_REGISTRATION.yaml ...]
#       Starts Synapse with the slot registrations plus the given ones. Does nothing when it already
#       runs with the same configuration and registrations; restarts it when they changed.
#   synapse.sh stop     Stops Synapse and waits for it to exit.
#   synapse.sh reset    Stops Synapse and deletes its database and media store (the chroot, the
#                       generated config and the slot registrations stay).
#
# Slot i (1..$SLOT_COUNT) is $SLOTS_DIR/i/registration.yaml (appservice id unwedge-i, url
# http://127.0.0.1:$SLOT_BASE_PORT+i, bot @unwedgebot<i>, ghosts @webhook<i>_*) and
# $SLOTS_DIR/i/slot.env with the same facts as KEY=VALUE lines. Both are generated once and kept.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
need_root

DATA=$SYNAPSE_ROOT/data # /data inside the chroot
PID_FILE=$STACK_DIR/synapse.pid
FINGERPRINT_FILE=$STACK_DIR/synapse.fingerprint
VERSIONS_URL=http://127.0.0.1:$SYNAPSE_PORT/_matrix/client/versions

in_chroot() {
	# Runs a command in the chroot with a clean environment (the host's locale etc. may not exist there).
	env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/root chroot "$SYNAPSE_ROOT" "$@"
}

synapse_pids() {
	# The Synapse processes running in our chroot, found through /proc so that a lost or stale pid
	# file does not matter. Builtins only until a candidate turns up: this runs on every start.
	local root p args
	root=$(realpath "$SYNAPSE_ROOT" 2>/dev/null) || return 0
	for p in /proc/[0-9]*; do
		mapfile -d '' args 2>/dev/null <"$p/cmdline" || continue
		[[ " ${args[*]} " == *" synapse.app.homeserver "* && " ${args[*]} " != *" --generate-config "* ]] || continue
		[ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] || continue
		echo "${p#/proc/}"
	done
}

answering() { curl -fsS --max-time 2 -o /dev/null "$VERSIONS_URL" 2>/dev/null; }

# shellcheck disable=SC2016 # a sed expression, not a shell one
regex_escape() { printf '%s' "$1" | sed 's/[][\.*^$()+?{}|]/\\&/g'; }

ensure_slots() {
	local i dir reg as_token hs_token server_re
	server_re=$(regex_escape "$SYNAPSE_SERVER_NAME")
	for i in $(seq 1 "$SLOT_COUNT"); do
		dir=$SLOTS_DIR/$i
		reg=$dir/registration.yaml
		mkdir -p "$dir"
		if [ ! -s "$reg" ]; then
			# As mautrix bridges write them; the random sender_localpart is mautrix's habit too, the
			# bot itself is a user in the namespace.
			cat >"$reg.tmp" <<EOF
id: unwedge-$i
url: http://127.0.0.1:$((SLOT_BASE_PORT + i))
as_token: $(random_hex 32)
hs_token: $(random_hex 32)
sender_localpart: $(random_hex 16)
rate_limited: false
namespaces:
  users:
  - regex: ^@unwedgebot$i:$server_re\$
    exclusive: true
  - regex: ^@webhook${i}_.+:$server_re\$
    exclusive: true
de.sorunome.msc2409.push_ephemeral: true
receive_ephemeral: true
push_ephemeral: true
org.matrix.msc3202: true
io.element.msc4190: true
EOF
			mv -f "$reg.tmp" "$reg"
		fi
		as_token=$(awk '$1 == "as_token:" {print $2}' "$reg")
		hs_token=$(awk '$1 == "hs_token:" {print $2}' "$reg")
		write_if_changed "$dir/slot.env" <<EOF || true
SLOT_ID=unwedge-$i
SLOT_PORT=$((SLOT_BASE_PORT + i))
SLOT_BOT_LOCALPART=unwedgebot$i
SLOT_USERNAME_TEMPLATE=webhook${i}_{{.}}
SLOT_AS_TOKEN=$as_token
SLOT_HS_TOKEN=$hs_token
EOF
	done
}

rate_limits() {
	# Every rate limiter Synapse 1.160 reads (synapse/config/ratelimiting.py), lifted.
	local lift='{per_second: 1000000, burst_count: 1000000}' k
	for k in rc_message rc_registration rc_registration_token_validity rc_joins_per_room \
		rc_key_requests rc_3pid_validation rc_admin_redaction rc_third_party_invite rc_media_create \
		rc_delayed_event_mgmt rc_room_creation rc_reports rc_user_directory; do
		echo "$k: $lift"
	done
	cat <<EOF
rc_login:
  address: $lift
  account: $lift
  failed_attempts: $lift
rc_joins:
  local: $lift
  remote: $lift
rc_invites:
  per_room: $lift
  per_user: $lift
  per_issuer: $lift
rc_presence:
  per_user: $lift
EOF
}

write_config() {
	# write_config REGISTRATION...: the chroot's /data/unwedge.yaml (overrides homeserver.yaml,
	# key by key) and its log config, plus the registrations copied to /data/appservices.
	local f i wanted=() as_files=""
	mkdir -p "$DATA/appservices"
	add_registration() {
		write_if_changed "$DATA/appservices/$2" <"$1" || true
		wanted+=("$2")
		as_files+="  - /data/appservices/$2"$'\n'
	}
	for i in $(seq 1 "$SLOT_COUNT"); do
		add_registration "$SLOTS_DIR/$i/registration.yaml" "slot-$i.yaml"
	done
	i=0
	for f in "$@"; do
		i=$((i + 1))
		add_registration "$f" "extra-$i.yaml"
	done
	for f in "$DATA"/appservices/*; do
		[[ " ${wanted[*]} " == *" $(basename "$f") "* ]] || rm -f "$f"
	done

	write_if_changed "$DATA/unwedge.log.config" <<'EOF' || true
# Written by unwedge scripts/synapse.sh: log to stderr, which synapse.sh sends to its log file.
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  console:
    class: logging.StreamHandler
    formatter: precise
loggers:
  synapse.storage.SQL:
    level: INFO
root:
  level: INFO
  handlers: [console]
disable_existing_loggers: false
EOF

	write_if_changed "$DATA/unwedge.yaml" <<EOF || true
# Written by unwedge scripts/synapse.sh on every start; overrides /data/homeserver.yaml key by key.
# LOCAL TESTING ONLY: open registration without verification and no rate limits.
server_name: "$SYNAPSE_SERVER_NAME"
public_baseurl: http://127.0.0.1:$SYNAPSE_PORT/
pid_file: /data/homeserver.pid
listeners:
  - port: $SYNAPSE_PORT
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: /data/homeserver.db
media_store_path: /data/media_store
log_config: /data/unwedge.log.config
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
enable_registration: true
enable_registration_without_verification: true
$(rate_limits)
# MSC2409/MSC4203 to-device events and MSC3202 device lists / OTK counts in appservice
# transactions. MSC4190 (appservice device management) needs no server switch in Synapse 1.160:
# the registration's io.element.msc4190 flag turns it on per appservice.
experimental_features:
  msc2409_to_device_messages_enabled: true
  msc3202_transaction_extensions: true
app_service_config_files:
${as_files%$'\n'}
EOF
}

fingerprint() {
	# Everything Synapse reads at startup that these scripts control.
	cat "$DATA/homeserver.yaml" "$DATA/unwedge.yaml" "$DATA/unwedge.log.config" "$DATA"/appservices/* | sha256sum | cut -d' ' -f1
}

do_stop() {
	local pids
	pids=$(synapse_pids)
	if [ -n "$pids" ]; then
		log "stopping synapse"
		# shellcheck disable=SC2086 # one pid per word
		kill -TERM $pids 2>/dev/null || true
		for _ in $(seq 1 60); do
			[ -z "$(synapse_pids)" ] && break
			sleep 0.5
		done
		pids=$(synapse_pids)
		if [ -n "$pids" ]; then
			log "synapse did not exit in 30 s: killing it"
			# shellcheck disable=SC2086
			kill -KILL $pids 2>/dev/null || true
			sleep 0.5
		fi
	fi
	rm -f "$PID_FILE" "$FINGERPRINT_FILE"
}

do_start() {
	local f regs=() want pid
	for f in "$@"; do
		[ -r "$f" ] || { echo "no such registration file: $f" >&2; exit 1; }
		regs+=("$(realpath "$f")")
	done
	apt_install curl
	[ -f "$SYNAPSE_ROOT/usr/lib/python3/dist-packages/synapse/__init__.py" ] || bash "$(dirname "$0")/install-synapse.sh"
	mkdir -p "$STACK_DIR" "$DATA"
	if [ ! -f "$DATA/homeserver.yaml" ]; then
		log "generating synapse config for $SYNAPSE_SERVER_NAME"
		rm -f "$DATA/homeserver.yaml.tmp"
		in_chroot python3 -m synapse.app.homeserver --generate-config --report-stats=no \
			--server-name "$SYNAPSE_SERVER_NAME" --config-directory /data --data-directory /data \
			-c /data/homeserver.yaml.tmp >/dev/null
		mv "$DATA/homeserver.yaml.tmp" "$DATA/homeserver.yaml"
	fi
	ensure_slots
	write_config "${regs[@]}"
	want=$(fingerprint)

	if [ -n "$(synapse_pids)" ]; then
		if [ "$(cat "$FINGERPRINT_FILE" 2>/dev/null)" = "$want" ]; then
			wait_answering
			log "synapse already running on 127.0.0.1:$SYNAPSE_PORT"
			return 0
		fi
		log "synapse configuration or registrations changed: restarting"
		do_stop
	elif answering; then
		echo "something else answers on 127.0.0.1:$SYNAPSE_PORT; not starting synapse" >&2
		exit 1
	fi

	log "starting synapse"
	[ -f "$SYNAPSE_LOG" ] && mv -f "$SYNAPSE_LOG" "$SYNAPSE_LOG.prev"
	# setsid: not in the caller's process group, so a test runner's signals do not reach it; -w so
	# that $! lives as long as Synapse even when setsid has to fork.
	setsid -w env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/root \
		chroot "$SYNAPSE_ROOT" python3 -m synapse.app.homeserver \
		-c /data/homeserver.yaml -c /data/unwedge.yaml </dev/null >"$SYNAPSE_LOG" 2>&1 9>&- &
	pid=$!
	wait_answering "$pid"
	synapse_pids | head -1 >"$PID_FILE"
	echo "$want" >"$FINGERPRINT_FILE"
	log "synapse ready on 127.0.0.1:$SYNAPSE_PORT"
}

wait_answering() {
	# wait_answering [PID]: waits up to 60 s for the client API, failing early if PID exits.
	local pid=${1:-}
	for _ in $(seq 1 120); do
		answering && return 0
		if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
			break
		fi
		sleep 0.5
	done
	echo "synapse does not answer on $VERSIONS_URL; end of $SYNAPSE_LOG:" >&2
	tail -40 "$SYNAPSE_LOG" >&2 || true
	exit 1
}

case ${1:-} in
start)
	shift
	stack_lock
	do_start "$@"
	;;
stop)
	stack_lock
	do_stop
	;;
reset)
	stack_lock
	do_stop
	log "deleting synapse database and media store"
	rm -rf "$DATA"/homeserver.db "$DATA"/homeserver.db-* "$DATA/media_store"
	;;
*)
	echo "usage: $0 start [EXTRA_REGISTRATION.yaml ...] | stop | reset" >&2
	exit 2
	;;
esac
