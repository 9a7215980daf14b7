#!/usr/bin/env bash
# The project's test command: brings up the local stack (Postgres + Synapse) and runs every Go test
# against it. Stack-backed tests fail, rather than skip, when the stack is missing.
#
# Arguments go to every `go test` (for example -v). Without -run, -skip or -list the packages run
# side by side, in two phases (below); with one of them, the tests it selects run one package at
# a time, as `go test -p 1 ./...` would run them.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT" || exit 1
bash scripts/stack.sh up
export UNWEDGE_REQUIRE_STACK=1
export UNWEDGE_STACK_ENV="$STACK_ENV"
# Set below only where the fault tests run alone on the stack.
unset UNWEDGE_FAULT_TESTS
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

# The Prometheus alerts (deploy/prometheus/): promtool's check and their unit tests. That they name
# only metrics the bridge serves is bridge's TestDashboardMetrics.
install_promtool || log "failed to install promtool (Debian's prometheus package)"
if command -v promtool >/dev/null; then
	promtool check rules deploy/prometheus/unwedge-alerts.yml
	promtool test rules deploy/prometheus/unwedge-alerts_test.yml
else
	log "no promtool: the Prometheus alerts are not checked"
fi

gotest=(go test -tags goolm -count=1 -timeout 40m)

# The tests that exist only in the test build (the fault points' own, and those that act at a
# fault point): every test function in a file built with unwedgefault, in its package.
mapfile -t tagged < <(grep -rl --include='*_test.go' '^//go:build unwedgefault' . | grep -v '^./.git/')
tagged_names=$(awk '/^func Test[A-Za-z0-9_]*\(/ { name = $2; sub(/\(.*/, "", name); print name }' "${tagged[@]}" | sort -u | paste -sd'|' -)
mapfile -t tagged_pkgs < <(printf '%s\n' "${tagged[@]}" | xargs -n1 dirname | sort -u)
fault_points() {
	go test -tags goolm,unwedgefault -count=1 "$@" -run "^($tagged_names)\$" "${tagged_pkgs[@]}"
}

# Every fuzz target runs for a bounded number of inputs (its seed corpus already ran as a test),
# about 10 s each here; a target whose inputs cost more (FuzzKeyAnswers: a heal each) names a
# smaller count after a second colon. A count, not a duration: Go 1.26's fuzz coordinator can fail a target that
# found nothing with "context deadline exceeded" when a -fuzztime duration ends while a worker is
# busy (go.dev/issue/75804, fixed in Go 1.27). UNWEDGE_FUZZTIME takes either.
fuzz() {
	local fuzztime=${UNWEDGE_FUZZTIME:-20000x} target
	for target in crypto/unwedge:FuzzParseOlm crypto/unwedge:FuzzHandleToDevice crypto/unwedge:FuzzRecord crypto/unwedge:FuzzKeyAnswers:5000x webhook:FuzzPostMessageBody; do
		local pkg name count
		IFS=: read -r pkg name count <<<"$target"
		go test -tags goolm -count=1 "$@" -run '^$' -fuzz "^${name}\$" -fuzztime "${UNWEDGE_FUZZTIME:-${count:-$fuzztime}}" "./${pkg}/"
	done
}

filtered=false
for arg in "$@"; do
	case $arg in -run | -run=* | -skip | -skip=* | -list | -list=* | -test.run* | -test.skip* | -test.list*) filtered=true ;; esac
done
if $filtered; then
	# Fault tests stop and restart Synapse and Postgres: safe here, where packages run one at a time.
	UNWEDGE_FAULT_TESTS=1 "${gotest[@]}" -p 1 "$@" ./...
	fault_points "$@"
	fuzz "$@"
	exit 0
fi

# Phase 1: the fault tests that stop and restart Synapse or Postgres (every test function that
# calls RequireFaults; a helper that called it for a test would not be found, and that test would
# skip in phase 2, which does not allow faults), one package at a time, with nothing else on the
# stack.
mapfile -t faults < <(find . -name '*_test.go' -not -path './.git/*' -exec awk 'FNR == 1 { name = "" }
	/^func Test[A-Za-z0-9_]*\(/ { name = $2; sub(/\(.*/, "", name) }
	/RequireFaults\(t\)/ && name != "" { print FILENAME " " name }' {} + | sort -u)
fault_names=$(printf '%s\n' "${faults[@]#* }" | sort -u | paste -sd'|' -)
mapfile -t fault_pkgs < <(printf '%s\n' "${faults[@]% *}" | xargs -n1 dirname | sort -u)
if [ -n "$fault_names" ]; then
	log "phase 1: ${fault_names//|/, } (they stop Synapse or Postgres), alone on the stack"
	UNWEDGE_FAULT_TESTS=1 "${gotest[@]}" -p 1 -run "^($fault_names)\$" "$@" "${fault_pkgs[@]}"
fi

# Phase 2: everything else, in three lanes side by side: most of the end-to-end tests' time is
# waiting for the bridge's and bridgev2's timers, not CPU. The wedge lab runs two scenarios at a
# time (each with a stock and an unwedge bridge), e2e three tests at a time plus its shared bridge:
# at most 8 bridges, the homeserver's 8 appservice slots. The third lane is every other package,
# two at a time, then the fault points' tests and the fuzz targets. Each lane's output is printed
# when it ends.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
skip=()
[ -n "$fault_names" ] && skip=(-skip "^($fault_names)\$")
mapfile -t others < <(go list ./... | grep -v -e '/e2e$' -e '/lab$')
declare -A lanes
lane() {
	local name=$1
	shift
	"$@" >"$logs/$name" 2>&1 &
	lanes[$!]=$name
}
lane lab "${gotest[@]}" -parallel 2 "$@" ./lab/
lane e2e "${gotest[@]}" -parallel 3 "${skip[@]}" "$@" ./e2e/
# shellcheck disable=SC2317 # run through lane
others_lane() {
	# At a lower priority: the unit tests and the fuzz targets keep both cores busy, and the
	# homeserver and the bridges of the other two lanes answer within their tests' timeouts.
	renice -n 10 -p "$BASHPID" >/dev/null
	"${gotest[@]}" -p 2 "${skip[@]}" "$@" "${others[@]}" && fault_points "$@" && fuzz "$@"
}
lane others others_lane "$@"
log "phase 2: lanes ${lanes[*]} side by side"
status=0
while [ ${#lanes[@]} -gt 0 ]; do
	ended=
	wait -n -p ended "${!lanes[@]}" || status=1
	log "lane ${lanes[$ended]} done"
	cat "$logs/${lanes[$ended]}"
	unset "lanes[$ended]"
done
exit "$status"
