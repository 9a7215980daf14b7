#!/usr/bin/env bash
# Regenerates example-config.yaml and registration.yaml from the bridge binary: mxmain's full
# example config with end-to-bridge encryption allowed and on by default, and a registration that
# matches it (tokens left as placeholders, as the example config has them).
set -euo pipefail
cd "$(dirname "$0")/.."
./build.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
./unwedge-bridge -e -c "$tmp/config.yaml" >/dev/null
# Only the first allow/default keys under `encryption:` are flipped.
awk '
	/^encryption:/ { enc = 1 }
	/^[a-z]/ && !/^encryption:/ { enc = 0 }
	enc && /^    allow: false/ { sub(/false/, "true") }
	enc && /^    default: false/ { sub(/false/, "true") }
	{ print }
' "$tmp/config.yaml" >example-config.yaml
# -g refuses the placeholder domain, so generate with a stand-in and put the placeholder back.
sed 's/domain: example.com/domain: example.invalid/' example-config.yaml >"$tmp/gen.yaml"
./unwedge-bridge -g -c "$tmp/gen.yaml" -r "$tmp/registration.yaml" >/dev/null
sed -e 's/example\\\.invalid/example\\.com/g; s/example\.invalid/example.com/g' \
	-e 's/^\(as_token\|hs_token\): .*/\1: This value is generated when generating the registration/' \
	"$tmp/registration.yaml" >registration.yaml
echo "wrote example-config.yaml and registration.yaml"
