#!/bin/bash
# The finaliser: packs the agent's work for the host. Runs in a fresh container of the agent image, with
# no network, after the agent's container has stopped (also when it was killed). It commits whatever the
# agent left uncommitted, points refs/heads/sandbox/<run-id> at the result, and writes a git bundle that
# the host verifies and fetches. The host never runs git inside this workspace.
set -uo pipefail

run_id=${SANDBOX_RUN_ID:?}
base=${SANDBOX_BASE_COMMIT:?}
reason=${SANDBOX_END_REASON:-completed}
out=/sandbox/out
branch="refs/heads/${SANDBOX_BRANCH:-sandbox/$run_id}"

result() {  # status head finaliser_commit bundle detail
  jq -n --arg status "$1" --arg head "$2" --arg fin "$3" --arg bundle "$4" --arg detail "$5" \
    'def opt: if . == "" then null else . end;
     {status: $status, head: ($head | opt), finaliser_commit: ($fin | opt), bundle: ($bundle | opt),
      detail: $detail}' >"$out/result.json"
}

cd /workspace || { result error "" "" "" "workspace is missing"; exit 0; }
# The agent controlled this repository's hooks and config. Inside its own sandbox that harms nobody, but
# packing its work must not depend on them. The built-in exclude list, given on the command line where no
# repository config can override it, keeps generated files (bytecode, caches, node_modules) off the branch.
g() {
  git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c core.untrackedCache=false \
      -c commit.gpgSign=false -c gc.auto=0 -c core.excludesFile=/opt/sandbox/gitignore "$@"
}

if ! g rev-parse --git-dir >/dev/null 2>&1; then
  result error "" "" "" "the workspace is no longer a git repository"
  exit 0
fi

fin=""
g add -A 2>"$out/finalize.err"
if ! g diff --cached --quiet 2>>"$out/finalize.err"; then
  if [ "$reason" = completed ]; then
    msg="sandbox: uncommitted work left by run $run_id"
  else
    msg="sandbox: run $run_id was stopped ($reason); uncommitted work at that point"
  fi
  if g commit -q --no-verify -m "$msg" 2>>"$out/finalize.err"; then
    fin=$(g rev-parse HEAD)
  else
    result error "" "" "" "could not commit the uncommitted work: $(tail -n 3 "$out/finalize.err")"
    exit 0
  fi
fi

head=$(g rev-parse --verify -q HEAD^{commit})
if [ -z "$head" ]; then
  result error "" "" "" "HEAD does not name a commit"
  exit 0
fi
if [ "$head" = "$base" ]; then
  result unchanged "$head" "" "" "no commits and no changes"
  exit 0
fi
g update-ref "$branch" "$head"
if g bundle create "$out/work.bundle" "$branch" "^$base" 2>>"$out/finalize.err"; then
  result packed "$head" "$fin" work.bundle ""
else
  result error "$head" "$fin" "" "git bundle failed: $(tail -n 3 "$out/finalize.err")"
fi
exit 0
