#!/bin/bash
# The check: the operator's command (the test suite, say) on the agent's committed work. Runs in a fresh
# container of the agent image, under the run's policy (the network only through the sidecar's proxy),
# after the finaliser has packed the work. It builds a clean checkout of the packed head, so nothing that
# `pre` or the agent left in the workspace (ignored files, a virtualenv, node_modules) is seen. What the
# check writes is never packed: its only writable mount is /sandbox/check, which holds the checkout and the
# one JSON result, /sandbox/check/result.json (written last, after the command and its processes are done).
# That directory is also the checked code's to write, so the file is only its output: the verdict is this
# script's exit status, which the supervisor takes from the engine.
set -uo pipefail

# shellcheck source=env.sh
. /opt/sandbox/env.sh
wait_for_go_ahead /sandbox/in/check-ready

head=${SANDBOX_CHECK_HEAD:?}
dest=/sandbox/check/tree
out=/sandbox/check/result.json
limit=${SANDBOX_CHECK_TIMEOUT:-900}

result() {  # exit_code output
  jq -cn --arg out "$(printf '%s' "$2" | tail -c 4000)" --argjson rc "$1" --arg head "$head" \
    '{exit_code: $rc, output: $out, head: $head}' >"$out"
}

# The workspace is mounted read-only here and its config is the agent's: clone from it with hooks and
# fsmonitor off, borrowing its objects (which borrow the host's) instead of copying them.
g() { git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c protocol.file.allow=always "$@"; }
if ! clone_out=$(g clone --quiet --shared --no-checkout /workspace "$dest" 2>&1 \
                 && g -C "$dest" checkout --quiet --detach "$head" 2>&1); then
  result 125 "sandbox: could not check out $head for the check: $clone_out"
  exit 125
fi
cd "$dest" || exit 125
check_out=$(timeout --kill-after=10 "$limit" bash /sandbox/in/check.sh 2>&1)
rc=$?
[ "$rc" = 124 ] && check_out="$check_out
sandbox: the check did not finish within ${limit}s"
result "$rc" "$check_out"
exit "$rc"
