#!/usr/bin/env bash
# Runs the wedge lab on the local stack: every way an Olm session wedges, stock mautrix-go and
# unwedge side by side. Arguments go to cmd/wedgelab (--quick, --json PATH, --mode, --scenario,
# --rules mautrix|element-web|element-x|all, --appservice, --keep DIR, --set path=value, --k N
# messages per phase and direction, --parallel N scenarios at once).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT" || exit 1
bash scripts/stack.sh up
export UNWEDGE_STACK_ENV="$STACK_ENV"
go run -tags goolm ./cmd/wedgelab "$@"
