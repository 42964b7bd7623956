#!/bin/bash
# Entry point of the agent container (runs as `agent`). Sets the git identity, then runs Claude Code with
# the task on stdin so that no task text, however long, meets the argument-size limit.
set -euo pipefail

# shellcheck source=env.sh
. /opt/sandbox/env.sh
wait_for_go_ahead /sandbox/in/network-ready

mkdir -p "$HOME/.claude"
if [ -n "${GIT_AUTHOR_NAME:-}" ]; then
  git config --global user.name "$GIT_AUTHOR_NAME"
  git config --global user.email "$GIT_AUTHOR_EMAIL"
fi

# A deterministic updater (pip-compile --upgrade, npm update, ...) may run before the agent, under the same
# policy. Its outcome goes out as one JSON line ahead of Claude Code's stream, for the audit trail.
if [ -f /sandbox/in/pre.sh ]; then
  set +e
  pre_out=$(cd /workspace && bash /sandbox/in/pre.sh 2>&1)
  pre_rc=$?
  set -e
  jq -cn --arg out "$(printf '%s' "$pre_out" | tail -c 4000)" --argjson rc "$pre_rc" \
    '{type: "sandbox_pre", exit_code: $rc, output: $out}'
fi

task=/sandbox/in/task.md
if [ ! -r "$task" ]; then
  echo "entrypoint: no task at $task" >&2
  exit 64
fi
exec claude "$@" <"$task"
