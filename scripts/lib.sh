# shellcheck shell=bash disable=SC2034 # settings used by the scripts that source this file
# Shared settings for the local stack scripts. Sourced, not run.
# Everything that lives outside the clone (the Synapse chroot, Postgres cluster, state of a running
# stack) is kept under UNWEDGE_HOME so that a fresh clone reuses what an earlier run built.

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNWEDGE_HOME=${UNWEDGE_HOME:-/var/cache/unwedge}
SYNAPSE_ROOT=${SYNAPSE_ROOT:-$UNWEDGE_HOME/synapse-root}
STACK_DIR=${STACK_DIR:-$UNWEDGE_HOME/stack}

PG_HOST=127.0.0.1
PG_PORT=${PG_PORT:-5432}
PG_USER=${PG_USER:-unwedge}
PG_PASSWORD=${PG_PASSWORD:-unwedge}
PG_DB=${PG_DB:-unwedge}

SYNAPSE_PORT=${SYNAPSE_PORT:-8008}
SYNAPSE_SERVER_NAME=${SYNAPSE_SERVER_NAME:-localhost}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

need_root() {
	if [ "$(id -u)" != 0 ]; then
		echo "this script installs packages and starts services: run it as root" >&2
		exit 1
	fi
}

apt_install() {
	# apt_install PKG...: installs the packages that are missing, running apt-get update once.
	local missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	log "installing ${missing[*]}"
	if [ ! -f /var/lib/apt/periodic/unwedge-updated ] ||
		! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
		apt-get update -q >/dev/null
		mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/unwedge-updated
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

install_promtool() (
	# install_promtool: installs Debian's prometheus package for its promtool, which test.sh runs
	# on deploy/prometheus/. The package's postinst starts the Prometheus server (invoke-rc.d, or
	# deb-systemd-invoke under systemd) and enables it at boot; the tests want neither. For the
	# install a policy-rc.d that refuses every start (exit 101, policy-rc.d(8): both helpers ask
	# it) stands in for the machine's own, which is put back after; then the boot start is turned
	# off. A machine with the package, or with promtool from elsewhere, is left as it is.
	if command -v promtool >/dev/null ||
		dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "install ok installed"; then
		exit 0
	fi
	policy=/usr/sbin/policy-rc.d
	saved=
	if [ -e "$policy" ]; then
		saved=$(mktemp)
		cp -p "$policy" "$saved"
	fi
	trap 'if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi' EXIT
	printf '#!/bin/sh\n# scripts/lib.sh install_promtool: no service starts while prometheus is installed.\nexit 101\n' >"$policy"
	chmod 0755 "$policy"
	apt_install prometheus
	if command -v deb-systemd-helper >/dev/null; then
		deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true
	fi
	update-rc.d prometheus disable >/dev/null 2>&1 || true
)

debian_mirror() {
	# The Debian mirror this machine's apt uses, so the sid chroot comes from the same place.
	local m
	m=$(grep -hoE '^URIs: *[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -m1 '/debian$' || true)
	[ -n "$m" ] || m=$(grep -hoE '^deb +[^ ]+/debian ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
	[ -n "$m" ] || m=http://deb.debian.org/debian
	echo "$m"
}

# The local test stack (scripts/stack.sh): Synapse's bridge slots and the env file that tests read.
SLOT_COUNT=${SLOT_COUNT:-8}
SLOT_BASE_PORT=${SLOT_BASE_PORT:-29400}
SLOTS_DIR=$STACK_DIR/slots
STACK_ENV=$STACK_DIR/env
SYNAPSE_LOG=$STACK_DIR/synapse.log
PG_VERSION=${PG_VERSION:-15}

stack_lock() {
	# Serialises the scripts that change the stack (several agents and test runs share it). The
	# lock is fd 9, inherited by the scripts run from the one holding it; daemons must be started
	# with 9>&- so they do not keep it.
	[ -n "${UNWEDGE_STACK_LOCKED:-}" ] && return 0
	mkdir -p "$STACK_DIR"
	exec 9>>"$STACK_DIR/.lock"
	flock 9
	export UNWEDGE_STACK_LOCKED=1
}

random_hex() {
	# random_hex BYTES: that many random bytes as lowercase hex.
	od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}

write_if_changed() {
	# write_if_changed FILE: writes stdin to FILE unless FILE already has exactly that content.
	# Returns 0 when it wrote, 1 when FILE was already up to date.
	local file=$1 tmp
	tmp=$(mktemp "$file.XXXXXX")
	cat >"$tmp"
	if [ -f "$file" ] && cmp -s "$tmp" "$file"; then
		rm -f "$tmp"
		return 1
	fi
	chmod 0644 "$tmp"
	mv -f "$tmp" "$file"
}
