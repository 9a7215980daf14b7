#!/usr/bin/env bash
# The project's test command: brings up the local stack (Postgres + Synapse) and runs every Go test
# against it. Stack-backed tests fail, rather than skip, when the stack is missing.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT" || exit 1
bash scripts/stack.sh up
export UNWEDGE_REQUIRE_STACK=1
# Fault tests stop and restart Synapse and Postgres: safe here, where packages run one at a time.
export UNWEDGE_FAULT_TESTS=1
export UNWEDGE_STACK_ENV="$STACK_ENV"
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
	echo "gofmt would change: $unformatted" >&2
	exit 1
fi
# The test build (unwedgefault: fault points, which the product build has none of) is checked too.
go vet -tags goolm ./...
go vet -tags goolm,unwedgefault ./...
staticcheck=$(go env GOPATH)/bin/staticcheck
[ -x "$staticcheck" ] || go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
"$staticcheck" -tags goolm ./...
"$staticcheck" -tags goolm,unwedgefault ./...
# One package at a time: the end-to-end packages each run bridges and clients on 2 cores. The
# fault tests build their bridge with the unwedgefault tag themselves.
go test -tags goolm -count=1 -p 1 -timeout 40m "$@" ./...
# The tests of the fault points themselves exist only in the test build.
go test -tags goolm,unwedgefault -count=1 "$@" -run '^TestFault' ./internal/fault/... ./crypto/unwedge/
# Every fuzz target runs for a bounded number of inputs (its seed corpus already ran above, as a
# test), about 10 s each here. A count, not a duration: Go 1.26's fuzz coordinator can fail a
# target that found nothing with "context deadline exceeded" when a -fuzztime duration ends
# while a worker is busy (go.dev/issue/75804, fixed in Go 1.27). UNWEDGE_FUZZTIME takes either.
fuzztime=${UNWEDGE_FUZZTIME:-20000x}
for target in crypto/unwedge:FuzzParseOlm crypto/unwedge:FuzzHandleToDevice crypto/unwedge:FuzzRecord webhook:FuzzPostMessageBody; do
	go test -tags goolm -count=1 "$@" -run '^$' -fuzz "^${target#*:}\$" -fuzztime "$fuzztime" "./${target%%:*}/"
done
