#!/bin/bash
# The finaliser: packs the agent's work for the host. Runs in a fresh container of the agent image, with
# no network, after the agent's container has stopped (also when it was killed). It commits whatever the
# agent left uncommitted, points refs/heads/sandbox/<run-id> at the result, and writes a git bundle that
# the host verifies and fetches. The host never runs git inside this workspace.
#
# Nothing the agent configured runs here. The workspace's .git is the agent's: its config (filters,
# fsmonitor, hooksPath, includes, extensions, pager, sshCommand), hooks, info/attributes and index format
# are all its choice. So this script never uses that directory as a git directory: it packs with a git
# directory of its own in /tmp, whose config it writes, with no system or global config, no hooks and no
# attributes file. From the agent's repository it takes data only: the object store (the new objects are
# written there, so the check can clone the packed head), the commit HEAD names (read as a file, not by
# git), the index (when git can read it with this config; else HEAD's tree) and info/exclude patterns.
# A .gitattributes in the tree can still name drivers, but no driver is defined: content passes through.
#
# Everything written is bounded by the run's disk limit (SANDBOX_DISK_LIMIT, bytes): no file this script or
# git writes may grow past it (ulimit -f, with SIGXFSZ ignored so that the write fails and git cleans up),
# and what lands in the host's run directory is the bundle, result.json and at most 64 KiB of errors.
set -uo pipefail

# Started ahead (SANDBOX_GO_AHEAD set), it waits for its go-ahead while the agent works, for SANDBOX_HOLD_SECONDS
# at most, without forking: the file's content is why the run ended. Its deadline below counts from the go-ahead.
# Made ahead by the warm pool (SANDBOX_START_FILE), before its run, it takes the run's own settings (base commit,
# branch, disk limit, git identity) from its inputs then, which nothing of the run's can write: those names only.
if [ -n "${SANDBOX_GO_AHEAD:-}" ] && [ -z "${SANDBOX_UNDER_DEADLINE:-}" ]; then
  if ! start_env=$(python3 -I -c '
import json, os, re, shlex, sys, time
gate, end, start = sys.argv[1], time.monotonic() + float(sys.argv[2]), sys.argv[3]
while not os.path.exists(gate):
    if time.monotonic() > end:
        sys.exit(1)
    time.sleep(0.01)
if start:
    names = re.compile(r"(SANDBOX_(BASE_COMMIT|BRANCH|DISK_LIMIT)|GIT_(AUTHOR|COMMITTER)_(NAME|EMAIL))")
    for key, value in json.load(open(start))["env"].items():
        if names.fullmatch(key) and isinstance(value, str):
            print(f"export {key}={shlex.quote(value)}")
' "$SANDBOX_GO_AHEAD" "${SANDBOX_HOLD_SECONDS:-60}" "${SANDBOX_START_FILE:-}"); then
    echo "finalize: the supervisor never gave the go-ahead ($SANDBOX_GO_AHEAD), or its settings were unreadable" >&2
    exit 65
  fi
  eval "$start_env"
  note=$(head -c 64 "$SANDBOX_GO_AHEAD" | tr -cd 'A-Za-z0-9_-')
  if [ -n "$note" ]; then export SANDBOX_END_REASON=$note; fi
fi

# The finaliser never hangs for good, supervisor or not: with SANDBOX_DEADLINE_SECONDS set it runs itself
# again under coreutils `timeout` (TERM when the deadline passes, KILL 10 s later), as the agent's entrypoint does.
if [ -n "${SANDBOX_DEADLINE_SECONDS:-}" ] && [ -z "${SANDBOX_UNDER_DEADLINE:-}" ]; then
  if ! [[ $SANDBOX_DEADLINE_SECONDS =~ ^[0-9]+([.][0-9]+)?$ && $SANDBOX_DEADLINE_SECONDS =~ [1-9] ]]; then
    echo "finalize: SANDBOX_DEADLINE_SECONDS=$SANDBOX_DEADLINE_SECONDS is not a positive number of seconds" >&2
    exit 64
  fi
  export SANDBOX_UNDER_DEADLINE=1
  exec timeout --kill-after=10 "$SANDBOX_DEADLINE_SECONDS" bash "$0" "$@"
fi

run_id=${SANDBOX_RUN_ID:?}
base=${SANDBOX_BASE_COMMIT:?}
reason=${SANDBOX_END_REASON:-completed}
limit=${SANDBOX_DISK_LIMIT:-}
out=/sandbox/out
branch="refs/heads/${SANDBOX_BRANCH:-sandbox/$run_id}"
ws=/workspace
agent_git=$ws/.git
pack=/tmp/pack.git
err=/tmp/finalize.err

if [[ $limit =~ ^[0-9]+$ ]] && [ "$limit" -gt 0 ]; then
  trap '' XFSZ
  ulimit -f $(((limit + 1023) / 1024))
fi

result() {  # status head finaliser_commit bundle detail
  tail -c 65536 "$err" >"$out/finalize.err" 2>/dev/null
  jq -n --arg status "$1" --arg head "$2" --arg fin "$3" --arg bundle "$4" --arg detail "${5:0:2000}" \
    'def opt: if . == "" then null else . end;
     {status: $status, head: ($head | opt), finaliser_commit: ($fin | opt), bundle: ($bundle | opt),
      detail: $detail}' >"$out/result.json"
}
fail() { result error "${2:-}" "${3:-}" "" "$1"; exit 0; }
last_err() { tail -n 3 "$err" | tail -c 600; }

: >"$err"
# Git reads nothing but the config written below: no system or global config, no overrides by environment.
while IFS= read -r name; do
  case $name in GIT_AUTHOR_*|GIT_COMMITTER_*) ;; GIT_*) unset "$name" ;; esac
done < <(compgen -e)
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null GIT_DIR=$pack GIT_WORK_TREE=$ws \
       GIT_INDEX_FILE=$pack/index GIT_OBJECT_DIRECTORY=$agent_git/objects GIT_NO_REPLACE_OBJECTS=1 \
       GIT_TERMINAL_PROMPT=0 GIT_EDITOR=true GIT_PAGER=cat PAGER=cat
unset XDG_CONFIG_HOME
g() { git --no-pager -c core.hooksPath=/dev/null -c core.fsmonitor=false -c core.attributesFile=/dev/null "$@"; }

[ -d "$ws" ] || fail "workspace is missing"
# The only places written in the workspace are its object directories. A link there could send the writes
# out of the workspace (into /sandbox/out, on the host), so the store must be plain directories.
if [ -L "$agent_git" ] || [ ! -d "$agent_git" ] || [ -L "$agent_git/objects" ] || [ ! -d "$agent_git/objects" ]; then
  fail "the workspace is no longer a git repository (.git and .git/objects must be directories)"
fi
if [ -n "$(find "$agent_git/objects" -mindepth 1 -maxdepth 1 -type l -print -quit 2>/dev/null)" ]; then
  fail "the workspace's object store holds symbolic links; refusing to write into it"
fi

mkdir -p "$pack/refs/heads" "$pack/info" || fail "could not create the packing directory"
cat >"$pack/config" <<'EOF'
[core]
	repositoryformatversion = 0
	bare = false
	filemode = true
	symlinks = true
	ignorecase = false
	precomposeunicode = false
	autocrlf = false
	safecrlf = false
	logallrefupdates = false
	hooksPath = /dev/null
	fsmonitor = false
	untrackedCache = false
	splitIndex = false
	sparseCheckout = false
	attributesFile = /dev/null
	excludesFile = /opt/sandbox/gitignore
	pager = cat
	editor = true
[index]
	sparse = false
[commit]
	gpgSign = false
[gc]
	auto = 0
[maintenance]
	auto = false
EOF
printf 'ref: %s\n' "$branch" >"$pack/HEAD"
# The agent's own exclude patterns (data, no code) still keep its ignored files off the branch.
if [ -f "$agent_git/info/exclude" ] && [ ! -L "$agent_git/info/exclude" ]; then
  head -c 1048576 "$agent_git/info/exclude" >"$pack/info/exclude" 2>/dev/null
fi

# The commit the workspace's HEAD names, read as files (loose ref or packed-refs), never through git in
# the agent's repository.
read_ref() {  # file -> first line, bounded
  [ -f "$1" ] && [ ! -L "$1" ] && head -c 300 "$1" 2>/dev/null | head -n 1
}
agent_head() {
  local value ref sha="" i
  value=$(read_ref "$agent_git/HEAD") || return 1
  for i in 1 2 3 4 5; do
    case $value in
      "ref: "*)
        ref=${value#ref: }
        [[ $ref == refs/* ]] && g check-ref-format "$ref" || return 1
        if value=$(read_ref "$agent_git/$ref") && [ -n "$value" ]; then
          continue
        fi
        [ -f "$agent_git/packed-refs" ] && [ ! -L "$agent_git/packed-refs" ] || return 1
        value=$(awk -v r="$ref" '$2 == r && $1 ~ /^[0-9a-f]+$/ { print $1; exit }' "$agent_git/packed-refs")
        ;;
      *) sha=$value; break ;;
    esac
  done
  [[ $sha =~ ^[0-9a-f]{40}$ ]] && printf '%s\n' "$sha"
}
agent=$(agent_head) || fail "HEAD does not name a commit"
g cat-file -e "$agent^{commit}" 2>>"$err" || fail "HEAD does not name a commit: $agent is not in the object store"
g update-ref "$branch" "$agent" 2>>"$err" || fail "could not set $branch: $(last_err)"

# The index: the agent's, if git reads it with this config (that keeps what the agent staged); else HEAD's tree.
if ! { [ -f "$agent_git/index" ] && [ ! -L "$agent_git/index" ] && cp "$agent_git/index" "$pack/index" 2>>"$err" \
       && g ls-files --stage >/dev/null 2>>"$err"; }; then
  rm -f "$pack/index"
  g read-tree "$branch" 2>>"$err" || fail "could not read the tree of $agent: $(last_err)" "$agent"
fi

fin=""
g add -A 2>>"$err" || fail "could not stage the uncommitted work: $(last_err)" "$agent"
if ! g diff --cached --quiet 2>>"$err"; then
  if [ "$reason" = completed ]; then
    msg="sandbox: uncommitted work left by run $run_id"
  else
    msg="sandbox: run $run_id was stopped ($reason); uncommitted work at that point"
  fi
  if g commit -q --no-verify --no-gpg-sign -m "$msg" 2>>"$err"; then
    fin=$(g rev-parse HEAD)
  else
    fail "could not commit the uncommitted work: $(last_err)"
  fi
fi

head=$(g rev-parse --verify -q "HEAD^{commit}")
[ -n "$head" ] || fail "HEAD does not name a commit"
if [ "$head" = "$base" ]; then
  result unchanged "$head" "" "" "no commits and no changes"
  exit 0
fi
# A finaliser stopped while bundling (its deadline, a removal after its supervisor died) leaves its lock and a
# part behind: out/ is the finalisers' alone (the agent never has it), so what is there is an earlier one's.
rm -f "$out/work.bundle" "$out/work.bundle.lock"
if g bundle create "$out/work.bundle" "$branch" "^$base" 2>>"$err"; then
  result packed "$head" "$fin" work.bundle ""
else
  rm -f "$out/work.bundle" "$out/work.bundle.lock"
  result error "$head" "$fin" "" "git bundle failed (over the disk limit of ${limit:-?} bytes?): $(last_err)"
fi
exit 0
