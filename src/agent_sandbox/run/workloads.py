"""The recipes of a run's four workloads (the sidecar, the agent, the check, the finaliser), in the
backend-neutral terms of backend/plan.py: what each runs, sees, may reach and may use.

Pure functions of the run's spec: no platform is touched here, so the recipes are unit-tested as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent_sandbox.backend.plan import SIDECAR_NAME, ImageSet, Mount, Reach, Resources, Scratch, Workload
from agent_sandbox.config.policy import Policy
from agent_sandbox.git.checkout import CONTAINER_OBJECTS
from agent_sandbox.run import held_mounts
from agent_sandbox.run.liveness import HEARTBEAT_DIR
from agent_sandbox.run.spec import RunSpec
from agent_sandbox.sidecar.config import CONFIG_ENV, GATEWAY_PORT, KEY_ENV, PROXY_PORT, SidecarConfig
from agent_sandbox.sidecar.contract import HELD_DIR_ENV, HELD_OUT_ENV, HOLD_SECONDS

AGENT_UID = 1000
SIDECAR_UID = 1001
PLACEHOLDER_KEY = "sk-sandbox-placeholder-not-a-key"
CONTROL_SOCKET = "control.sock"  # the sidecar's settle socket (sidecar/__main__.py), in run_dir/model
SIDECAR_OUT = "/sandbox/model-out"  # where the sidecar sees run_dir/model, its own output directory
FINALISER_GO_AHEAD = "finalise-ready"  # in run_dir/in: a held finaliser's go-ahead, holding the end reason
SIDECAR_EVENTS = "events.jsonl"  # the sidecar's own numbered copy of its lines, in run_dir/model, for recovery
HELD_INPUTS = "sidecar-in"  # in the run dir: a held sidecar's configuration and key (fleet/pool.py)
HELD_TARGET = "/sandbox/sidecar-in"  # where the held sidecar sees it, read-only
MiB = 1024**2
AGENT_START = "agent-start"  # in run_dir/in: a held agent's start (init.py --held)
FINALISER_START = "finaliser-start"  # in run_dir/in: a held finaliser's settings (finalize.sh)
FINALISER_TIMEOUT = 300.0
DEADLINE_MARGIN = 120  # seconds the containers' own deadline leaves the supervisor past the wall clock
FINALISER_DEADLINE = FINALISER_TIMEOUT + DEADLINE_MARGIN  # the finaliser's own, from its go-ahead


@dataclass(frozen=True)
class Users:
    """Who owns the run's files and whom workloads run as."""

    chown: tuple[int, int] | None
    """Owner to give the directories the agent writes (None: the supervisor's own user)."""
    agent: str
    """uid:gid of the agent, the check and the finaliser."""
    sidecar: str
    """uid:gid of the sidecar."""

    @classmethod
    def here(cls) -> Users:
        if os.getuid() == 0:
            # Claude Code refuses to skip permission prompts as root, and the agent must not be root anyway.
            return cls((AGENT_UID, AGENT_UID), f"{AGENT_UID}:{AGENT_UID}", f"{SIDECAR_UID}:{SIDECAR_UID}")
        me = f"{os.getuid()}:{os.getgid()}"
        return cls(None, me, me)


def proxy_env() -> dict[str, str]:
    """Proxy settings for the agent, in every spelling its tools read."""
    url = f"http://{SIDECAR_NAME}:{PROXY_PORT}"
    no_proxy = f"{SIDECAR_NAME},localhost,127.0.0.1"
    env = {
        name: url
        for name in (
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
            "npm_config_proxy",
            "npm_config_https_proxy",
            "PIP_PROXY",
        )
    }
    env.update(NO_PROXY=no_proxy, no_proxy=no_proxy)
    return env


def git_identity(spec: RunSpec) -> dict[str, str]:
    author = spec.policy.git.author
    return {
        "GIT_AUTHOR_NAME": author.name,
        "GIT_AUTHOR_EMAIL": author.email,
        "GIT_COMMITTER_NAME": author.name,
        "GIT_COMMITTER_EMAIL": author.email,
    }


def sidecar_workload(
    image: str,
    users: Users,
    run_dir: Path,
    hosts: dict[str, str],
    env: dict[str, str],
    secret_env: dict[str, str] | None = None,
    mounts: list[Mount] | None = None,
) -> Workload:
    """The sidecar's workload, given how its configuration and key arrive (env, or a held sidecar's files)."""
    return Workload(
        role="sidecar",
        image=image,
        user=users.sidecar,
        env=env,
        secret_env=secret_env or {},
        mounts=[
            Mount(source=str(run_dir / "model"), target=SIDECAR_OUT, read_only=False),
            Mount(source=str(run_dir / HEARTBEAT_DIR), target="/sandbox/heartbeat"),
            *(mounts or []),
        ],
        scratch=[Scratch(path="/tmp", size_bytes=64 * MiB)],
        reach=Reach.OUTSIDE,
        hosts=hosts,
        resources=Resources(memory_bytes=512 * MiB, cpus=1.0, pids=128),
        # A lost DNS query costs a 1 s retry, not the resolver's default 5 s (the proxy resolves per name).
        dns_options=["timeout:1", "attempts:3"],
    )


def held_sidecar(image: str, users: Users, run_dir: Path, hosts: dict[str, str]) -> Workload:
    """A sidecar made ahead for a pool (fleet/pool.py): it waits for its configuration and key, which the run
    that claims it writes into run_dir/HELD_INPUTS (read-only in it), at HELD_TARGET."""
    return sidecar_workload(
        image,
        users,
        run_dir,
        hosts,
        env={HELD_DIR_ENV: HELD_TARGET, HELD_OUT_ENV: SIDECAR_OUT},
        mounts=[Mount(source=str(run_dir / HELD_INPUTS), target=HELD_TARGET, read_only=True)],
    )


AGENT_ENV = {
    "ANTHROPIC_BASE_URL": f"http://{SIDECAR_NAME}:{GATEWAY_PORT}",
    # Claude Code wants a key to start; the real one exists only in the sidecar.
    "ANTHROPIC_API_KEY": PLACEHOLDER_KEY,
}


def sandboxed(
    role: str,
    images: ImageSet,
    users: Users,
    policy: Policy,
    run_id: str,
    run_dir: Path,
    env: dict[str, str],
    mounts: list[Mount],
    go_ahead: str,
    **kwargs: object,
) -> Workload:
    """A workload that runs the agent's code (the agent, the check): the policy's limits, the sidecar alone to
    reach, the proxy, and no key."""
    lim = policy.limits
    uid, gid = (int(x) for x in users.agent.split(":"))
    return Workload.model_validate(
        {
            "role": role,
            "image": images.agent,
            "user": users.agent,
            "env": {**env, "SANDBOX_RUN_ID": run_id, "HOME": "/home/agent", **proxy_env()},
            "mounts": mounts,
            "reach": Reach.SIDECAR,
            "go_ahead": str(run_dir / "in" / go_ahead),
            "scratch": [
                Scratch(path="/tmp", size_bytes=min(lim.disk_bytes, 1024**3), exec=True),
                Scratch(path="/home/agent", size_bytes=512 * MiB, exec=True, owner=(uid, gid)),
            ],
            "resources": Resources(memory_bytes=lim.memory_bytes, cpus=lim.cpus, pids=lim.pids),
            "working_dir": "/workspace",
            "runtime": policy.agent.runtime,
            # Names the sidecar does not know get no answer: fail in a second, not ten.
            "dns_options": ["timeout:1", "attempts:1"],
            **kwargs,
        }
    )


def held_agent(images: ImageSet, users: Users, policy: Policy, run_id: str, run_dir: Path) -> Workload:
    """The agent's container as the warm pool makes it ahead of its run (fleet/pool.py): everything of the
    policy's, nothing of the task's. Its workspace and the repository's objects reach it later, through the
    run directory's shared mount points (held_mounts.py, hence `rslave`); it runs nothing until the run's start
    file (`Recipes.agent_start`: its arguments, git identity and deadline) is in its inputs."""
    return sandboxed(
        "agent",
        images,
        users,
        policy,
        run_id,
        run_dir,
        {**AGENT_ENV, "SANDBOX_HOLD_SECONDS": str(HOLD_SECONDS)},
        held_work_mounts(run_dir),
        "network-ready",
        own_init=True,
        follow=True,
    )


def held_work_mounts(run_dir: Path) -> list[Mount]:
    """What a held container sees of its run: the workspace and the objects, through the run directory's mount
    points (held_mounts.py), and the run's inputs."""
    return [
        Mount(source=str(run_dir / held_mounts.WORKSPACE), target="/workspace", read_only=False, propagated=True),
        Mount(source=str(run_dir / held_mounts.OBJECTS), target=CONTAINER_OBJECTS, read_only=True, propagated=True),
        Mount(source=str(run_dir / "in"), target="/sandbox/in", read_only=True),
    ]


def held_shape(images: ImageSet, users: Users, policy: Policy) -> dict[str, object]:
    """What a slot's held containers are made of, the run's own names aside: a run takes them only when its own
    would be made the same."""
    run_id, run_dir = "-", Path("/-")
    return {
        "agent": held_agent(images, users, policy, run_id, run_dir).model_dump(mode="json"),
        "finaliser": held_finaliser(images, users, policy, run_id, run_dir).model_dump(mode="json"),
    }


def finaliser_env(spec: RunSpec) -> dict[str, str]:
    """The finaliser's settings that are the run's own (the rest is the same for every run)."""
    return {
        "SANDBOX_BASE_COMMIT": spec.base_commit,
        "SANDBOX_BRANCH": spec.branch,
        # No file the finaliser writes (the bundle above all) may grow past the run's disk limit.
        "SANDBOX_DISK_LIMIT": str(spec.policy.limits.disk_bytes),
        **git_identity(spec),
    }


def finaliser(
    images: ImageSet,
    users: Users,
    policy: Policy,
    run_id: str,
    run_dir: Path,
    env: dict[str, str],
    deadline_s: float,
    mounts: list[Mount],
    go_ahead: bool,
) -> Workload:
    """The finaliser's workload: finalize.sh on the workspace, no network, the same runtime as the agent."""
    return Workload(
        role="finaliser",
        image=images.agent,
        user=users.agent,
        entrypoint=["/opt/sandbox/finalize.sh"],
        env={
            "SANDBOX_RUN_ID": run_id,
            **env,
            "HOME": "/tmp",
            # It ends by itself even if whoever waits for it dies (finalize.sh runs under `timeout`, from its
            # go-ahead on).
            "SANDBOX_DEADLINE_SECONDS": str(int(deadline_s)),
        },
        mounts=mounts,
        reach=Reach.NOTHING,
        go_ahead=str(run_dir / "in" / FINALISER_GO_AHEAD) if go_ahead else None,
        scratch=[Scratch(path="/tmp", size_bytes=256 * MiB)],
        resources=Resources(memory_bytes=1024**3, cpus=1.0, pids=256),
        working_dir="/workspace",
        # It reads what the agent left: the same runtime as the agent.
        runtime=policy.agent.runtime,
    )


def held_finaliser(images: ImageSet, users: Users, policy: Policy, run_id: str, run_dir: Path) -> Workload:
    """The finaliser as the warm pool makes it ahead of its run, beside the held agent: the same mount points,
    held for its go-ahead (which a run gives once its agent has ended), the run's own settings
    (`Recipes.finaliser_start`) read from its inputs after the go-ahead."""
    return finaliser(
        images,
        users,
        policy,
        run_id,
        run_dir,
        {
            "SANDBOX_GO_AHEAD": "/sandbox/in/" + FINALISER_GO_AHEAD,
            # The slot's wait, then its run's: past it, the run starts a finaliser of its own (collect.py).
            "SANDBOX_HOLD_SECONDS": str(2 * HOLD_SECONDS),
            "SANDBOX_START_FILE": "/sandbox/in/" + FINALISER_START,
        },
        FINALISER_DEADLINE,
        [
            *held_work_mounts(run_dir),
            Mount(source=str(run_dir / "out"), target="/sandbox/out", read_only=False),
        ],
        go_ahead=True,
    )


@dataclass(frozen=True)
class Recipes:
    """The workloads of one run."""

    spec: RunSpec
    images: ImageSet
    run_dir: Path
    objects: Path
    """The host repository's object directory, which the agent's workloads read and never write."""
    users: Users

    def claude_args(self) -> list[str]:
        return [
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            # Unattended: nobody is there to answer a prompt. The container is the boundary instead.
            "--permission-mode",
            "bypassPermissions",
            "--model",
            self.spec.model,
            "--max-turns",
            str(self.spec.policy.limits.max_turns),
            "--no-session-persistence",
        ]

    def work_mounts(self) -> list[Mount]:
        return [
            Mount(source=str(self.run_dir / "workspace"), target="/workspace", read_only=False),
            # History to read, never to write: the host's .git stays out of the agent's reach.
            Mount(source=str(self.objects), target=CONTAINER_OBJECTS, read_only=True),
            Mount(source=str(self.run_dir / "in"), target="/sandbox/in", read_only=True),
        ]

    def sidecar(self, config: SidecarConfig, api_key: str | None, mounts: list[Mount]) -> Workload:
        """The sidecar: the model gateway (with the only real key) and the egress proxy, reaching outside."""
        return sidecar_workload(
            self.images.sidecar,
            self.users,
            self.run_dir,
            self.spec.policy.egress.hosts,
            env={CONFIG_ENV: config.model_dump_json()},
            secret_env={KEY_ENV: api_key} if api_key else {},
            mounts=mounts,
        )

    def _sandboxed(
        self, role: str, env: dict[str, str], mounts: list[Mount], go_ahead: str, **kwargs: object
    ) -> Workload:
        return sandboxed(
            role,
            self.images,
            self.users,
            self.spec.policy,
            self.spec.run_id,
            self.run_dir,
            env,
            mounts,
            go_ahead,
            **kwargs,
        )

    def agent(self, deadline_s: float) -> Workload:
        """Claude Code on the workspace, headless, with the task on stdin."""
        return self._sandboxed(
            "agent",
            {
                **AGENT_ENV,
                **git_identity(self.spec),
                # Its entry point ends the container by itself past this, should the supervisor be gone.
                "SANDBOX_DEADLINE_SECONDS": str(int(deadline_s)),
            },
            self.work_mounts(),
            "network-ready",
            command=self.claude_args(),
            own_init=True,
            follow=True,
        )

    def held_agent(self) -> Workload:
        """The agent's workload as the warm pool made it for this run (held_agent): what a slot must match."""
        return held_agent(self.images, self.users, self.spec.policy, self.spec.run_id, self.run_dir)

    def agent_start(self, deadline_s: float, require: list[str]) -> dict[str, object]:
        """What a held agent's container (held_agent) is given at its start: what `agent` puts in its creation."""
        return {
            "deadline_s": int(deadline_s),
            "args": self.claude_args(),
            "env": git_identity(self.spec),
            "cwd": "/workspace",
            "require": require,
        }

    def check(self, head: str, timeout_s: int) -> Workload:
        """The operator's check on a clean checkout of the packed head."""
        mounts = [
            Mount(source=str(self.run_dir / "workspace"), target="/workspace", read_only=True),
            Mount(source=str(self.objects), target=CONTAINER_OBJECTS, read_only=True),
            Mount(source=str(self.run_dir / "in"), target="/sandbox/in", read_only=True),
            # Its only writable mount: the bundle in out/ stays out of reach of the code it runs.
            Mount(source=str(self.run_dir / "check"), target="/sandbox/check", read_only=False),
        ]
        return self._sandboxed(
            "check",
            {"SANDBOX_CHECK_HEAD": head, "SANDBOX_CHECK_TIMEOUT": str(timeout_s)},
            mounts,
            "check-ready",
            entrypoint=["/opt/sandbox/check.sh"],
        )

    def finaliser(self, reason: str | None, deadline_s: float, hold_s: float | None = None) -> Workload:
        """Packs the workspace into a bundle, with no network at all. With `hold_s` it is started ahead, while
        the agent works, and waits (up to hold_s) for its go-ahead, which carries the reason the run ended: its
        container's start is then off the run's critical path."""
        held = {}
        if hold_s is not None:
            held = {"SANDBOX_GO_AHEAD": "/sandbox/in/" + FINALISER_GO_AHEAD, "SANDBOX_HOLD_SECONDS": str(int(hold_s))}
        return finaliser(
            self.images,
            self.users,
            self.spec.policy,
            self.spec.run_id,
            self.run_dir,
            {**finaliser_env(self.spec), **({"SANDBOX_END_REASON": reason} if reason else {}), **held},
            deadline_s,
            [*self.work_mounts(), Mount(source=str(self.run_dir / "out"), target="/sandbox/out", read_only=False)],
            go_ahead=hold_s is not None,
        )

    def held_finaliser(self) -> Workload:
        """The finaliser's workload as the warm pool made it for this run (held_finaliser)."""
        return held_finaliser(self.images, self.users, self.spec.policy, self.spec.run_id, self.run_dir)

    def finaliser_start(self) -> dict[str, object]:
        """What a held finaliser (held_finaliser) is given before its go-ahead: what `finaliser` puts in its
        creation."""
        return {"env": finaliser_env(self.spec)}
