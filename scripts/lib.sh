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
	if [ ! -f /var/lib/apt/periodic/unwedge-updated ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
		apt-get update -q >/dev/null
		mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/unwedge-updated
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

debian_mirror() {
	# The Debian mirror this machine's apt uses, so the sid chroot comes from the same place.
	local m
	m=$(grep -hoE '^URIs: *[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -m1 '/debian$' || true)
	[ -n "$m" ] || m=$(grep -hoE '^deb +[^ ]+/debian ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
	[ -n "$m" ] || m=http://deb.debian.org/debian
	echo "$m"
}
