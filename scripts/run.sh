#!/usr/bin/env bash
# The main job: brings up Postgres and Synapse, builds the bridge, registers it with Synapse the
# way an admin would (./unwedge-bridge -g), starts it with end-to-bridge encryption, and shows an
# encrypted message going Matrix -> webhook network -> Matrix. Extra arguments go to cmd/demo
# (e.g. --keep-running).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT" || exit 1
bash scripts/stack.sh up
./build.sh
export UNWEDGE_STACK_ENV="$STACK_ENV"
go run -tags goolm ./cmd/demo --dir "$UNWEDGE_HOME/demo" "$@"
