#!/usr/bin/env bash
# Runs the benchmarks on the local stack, unwedge side by side with stock mautrix-go, and prints
# the table. Arguments go to cmd/bench (--quick, --json PATH).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT" || exit 1
bash scripts/stack.sh up
export UNWEDGE_STACK_ENV="$STACK_ENV"
go run -tags goolm ./cmd/bench "$@"
