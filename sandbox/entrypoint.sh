#!/bin/bash
# Entry point of the agent container (runs as `agent`). Sets the git identity, then runs Claude Code with
# the task on stdin so that no task text, however long, meets the argument-size limit.
set -euo pipefail

# The run's deadline (SANDBOX_DEADLINE_SECONDS: the supervisor's wall time plus a margin; unset, none): the
# container ends by itself when it passes, even if the supervisor is gone. As the container's PID 1 (the
# supervisor starts it without Docker's init), this script hands PID 1 to init.py, which runs it again beneath
# itself and holds the deadline where the agent cannot stop it (see init.py). Under another init it falls
# back to coreutils `timeout`, which the agent, as the same user, could stop.
# A container the warm pool made before its run (SANDBOX_HOLD_SECONDS) runs nothing until the run's start file
# arrives: init.py waits for it, then runs this script again with the run's arguments and deadline.
if [ -n "${SANDBOX_HOLD_SECONDS:-}" ] && [ -z "${SANDBOX_UNDER_DEADLINE:-}" ]; then
  if [ "$$" != 1 ]; then
    echo "entrypoint: a held container needs this script as its PID 1" >&2
    exit 64
  fi
  export SANDBOX_UNDER_DEADLINE=1
  exec python3 -I /opt/sandbox/init.py --held "$SANDBOX_HOLD_SECONDS" /sandbox/in/agent-start bash "$0" "$@"
fi
if [ -n "${SANDBOX_DEADLINE_SECONDS:-}" ] && [ -z "${SANDBOX_UNDER_DEADLINE:-}" ]; then
  if ! [[ $SANDBOX_DEADLINE_SECONDS =~ ^[0-9]+([.][0-9]+)?$ && $SANDBOX_DEADLINE_SECONDS =~ [1-9] ]]; then
    echo "entrypoint: SANDBOX_DEADLINE_SECONDS=$SANDBOX_DEADLINE_SECONDS is not a positive number of seconds" >&2
    exit 64
  fi
  export SANDBOX_UNDER_DEADLINE=1
  if [ "$$" = 1 ]; then
    exec python3 -I /opt/sandbox/init.py "$SANDBOX_DEADLINE_SECONDS" bash "$0" "$@"
  fi
  exec timeout --kill-after=10 "$SANDBOX_DEADLINE_SECONDS" bash "$0" "$@"
fi

# shellcheck source=env.sh
. /opt/sandbox/env.sh

# Set up while the supervisor confines the container: only $HOME (the container's own tmpfs) is written.
mkdir -p "$HOME/.claude"
if [ -n "${GIT_AUTHOR_NAME:-}" ]; then
  git config --global user.name "$GIT_AUTHOR_NAME"
  git config --global user.email "$GIT_AUTHOR_EMAIL"
fi

wait_for_go_ahead /sandbox/in/network-ready

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
