#!/usr/bin/env bash
# Builds a Debian sid chroot with matrix-synapse in it (bookworm does not package Synapse).
# Idempotent: an existing chroot with a working Synapse is reused.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
need_root

if [ -x "$SYNAPSE_ROOT/usr/bin/python3" ] && chroot "$SYNAPSE_ROOT" python3 -c 'import synapse' 2>/dev/null; then
	log "synapse chroot present at $SYNAPSE_ROOT"
	exit 0
fi
apt_install mmdebstrap
mkdir -p "$(dirname "$SYNAPSE_ROOT")"
tmp="$SYNAPSE_ROOT.tmp"
rm -rf "$tmp"
log "building synapse chroot in $SYNAPSE_ROOT (about 90 s)"
# The sid index served here is a frozen snapshot, so its Valid-Until has passed.
mmdebstrap --variant=apt --aptopt='Acquire::Check-Valid-Until "false"' \
	--include=matrix-synapse,curl,ca-certificates sid "$tmp" "$(debian_mirror)" >"$UNWEDGE_HOME/mmdebstrap.log" 2>&1 || {
	tail -20 "$UNWEDGE_HOME/mmdebstrap.log" >&2
	exit 1
}
rm -rf "$SYNAPSE_ROOT"
mv "$tmp" "$SYNAPSE_ROOT"
log "synapse chroot ready: $(chroot "$SYNAPSE_ROOT" python3 -c 'import synapse; print(synapse.__version__)')"
