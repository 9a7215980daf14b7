#!/bin/sh
# Builds ./unwedge-bridge with the pure-Go Olm implementation (libolm is deprecated). Extra arguments go
# to `go build`.
set -e
cd "$(dirname "$0")"
MAUTRIX_VERSION=$(grep 'maunium.net/go/mautrix ' go.mod | awk '{ print $2 }')
GO_LDFLAGS="-s -w -X main.Tag=$(git describe --exact-match --tags 2>/dev/null || true) -X main.Commit=$(git rev-parse --verify -q HEAD || echo unknown) -X 'main.BuildTime=$(date -Iseconds)' -X 'maunium.net/go/mautrix.GoModVersion=$MAUTRIX_VERSION'"
go build -tags goolm -ldflags="$GO_LDFLAGS" -o unwedge-bridge ./cmd/bridge "$@"
