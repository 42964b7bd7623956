"""After the agent: the finaliser packs its work, the operator's check runs on the packed head, and the host
imports the bundle onto the run's branch."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import git

from agent_sandbox.audit import events as ev
from agent_sandbox.backend.base import NotHeld
from agent_sandbox.backend.plan import NOTE_PATTERN, Role
from agent_sandbox.errors import SandboxError, disk_full
from agent_sandbox.git.checkout import Imported, branch_exists, import_bundle
from agent_sandbox.run import later, quota
from agent_sandbox.run.base import CHECK_TIMEOUT, DEADLINE_MARGIN
from agent_sandbox.run.output import (
    read_result,
)
from agent_sandbox.run.watch import Watching
from agent_sandbox.run.workloads import FINALISER_TIMEOUT

log = logging.getLogger(__name__)


class Collecting(Watching):
    """The agent's work, from its workspace to the branch."""

    def _discard_early(self, *roles: Role, network: bool = False) -> None:
        """Remove what has done its part while the run goes on; in a process that removes everything right after
        the run's answer (run/later.py: the warm daemon's runs), nothing: the removals would share the machine
        with the packing and the import, on the answer's path."""
        if not later.active():
            self.handle.discard(*roles, network=network)

    def _collect(self, reason: str) -> tuple[Imported | None, str | None]:
        # What has done its part goes while the finaliser (which has no network) starts and packs: the agent's
        # container, and unless a check still needs them, the sidecar and the networks. Teardown waits for it.
        if self.spec.check:
            self._discard_early("agent")
        else:
            self._discard_early("agent", "sidecar", network=True)
        ahead = self._finaliser_started_ahead()
        released = False
        if ahead is not None:
            try:
                self.handle.release("finaliser", reason if re.fullmatch(NOTE_PATTERN, reason) else "error")
                self._record_started(ahead["workload"], ahead["started"])
                released = True
            except (OSError, NotHeld) as exc:  # its go-ahead not written (a full disk), or it ended meanwhile
                log.warning("finaliser_ahead_unreleased run_id=%s error=%r", self.spec.run_id, exc)
        if not released:
            self._start(self.recipes.finaliser(reason, FINALISER_TIMEOUT + DEADLINE_MARGIN))
        info = self.handle.wait("finaliser", FINALISER_TIMEOUT)
        if info.running:
            self.handle.stop("finaliser", 1)
            return None, "the finaliser did not finish in time"
        result_path = self.run_dir / "out" / "result.json"
        try:
            result = read_result(result_path)
        except (OSError, ValueError):
            return None, f"the finaliser wrote no result (exit {info.exit_code}): {self._tail('finaliser')}"
        self._discard_early("finaliser")
        self._record_untrusted("supervisor", "finalised", result)
        if self.spec.check and result.get("head"):
            if self._cancel is None:
                self.check_result = self._run_check(result["head"])
            else:
                self._record(
                    ev.CheckRan(
                        exit_code=130, head=result["head"], interrupted=True, output=f"not run: {self._cancel[1]}"
                    )
                )
        if result.get("status") == "unchanged":
            self.work_settled = True
            return Imported(branch=None, head=None, commits=[]), None
        if result.get("status") != "packed":
            return None, f"the agent's work could not be packed: {result.get('detail')}"
        bundle = self.run_dir / "out" / "work.bundle"
        if bundle.is_symlink() or not bundle.is_file():
            self.work_settled = True  # refused, not lost: a bundle that is no plain file is never imported
            return None, "the finaliser reported a bundle but wrote no plain file"
        if bundle.stat().st_size > self.limits.disk_bytes:
            self.work_settled = True
            # Never import more than the disk limit into the host repository.
            return None, (
                f"the agent's bundle ({bundle.stat().st_size} bytes) is larger than the disk limit "
                f"of {self.limits.disk}; nothing was imported"
            )
        self.ui.phase("import", f"fetching the bundle into {self.spec.branch}")
        imported = self._import(bundle, result.get("head"))
        self.work_settled = True
        self._files = self._diffstat(imported)
        self._record(
            ev.Imported(branch=imported.branch, head=imported.head, commits=imported.commits, files=self._files)
        )
        if imported.head != result.get("head"):
            # The bundle must hold what the finaliser packed, which is also what the check saw.
            return imported, (
                f"the imported head {imported.head} is not the packed head {result.get('head')}; "
                "the branch is kept for inspection"
            )
        return imported, None

    def _on_branch(self) -> Imported | None:
        """What the run's branch holds in the host repository now, or None without the branch."""
        if not branch_exists(self.repo, self.spec.branch):
            return None
        g = git.Git(self.repo.path)
        head = g.rev_parse("--verify", f"refs/heads/{self.spec.branch}")
        return Imported(
            branch=self.spec.branch,
            head=head,
            commits=g.rev_list("--reverse", f"{self.spec.base_commit}..{head}").split(),
        )

    def _import(self, bundle: Path, head: str | None) -> Imported:
        """Fetch the bundle onto the branch. A recovery may find the branch there already, at the packed head
        (the dead supervisor got that far): that is the work, imported."""
        try:
            return import_bundle(
                self.repo, bundle, self.spec.branch, self.spec.base_commit, replace=self.spec.replace_branch
            )
        except SandboxError as exc:
            there = self._on_branch()
            if head and there is not None and there.head == head:
                return there
            if disk_full(exc):
                self.environment_failure = f"the host repository's filesystem is full: {exc.message}"
                raise
            if self.spec.follow_up and there is not None:
                # Another run moved the branch since this follow-up started from it (two follow-ups at once): the
                # work is not a fast-forward any more. It is kept on a branch of its own, never dropped.
                aside = f"{self.spec.branch}-{self.spec.run_id}"
                log.info(
                    "follow_up_kept_aside run_id=%s branch=%s moved_to=%s",
                    self.spec.run_id,
                    self.spec.branch,
                    there.head,
                )
                imported = import_bundle(self.repo, bundle, self.spec.branch, self.spec.base_commit, into=aside)
                self.spec.warnings.append(
                    f"{self.spec.branch} moved on while this run worked (another run landed there): its work is on "
                    f"{aside} instead, to merge or rebase by hand"
                )
                return imported
            self.work_settled = True  # refused for what it is, not for want of room: nothing to retry
            raise

    def _run_check(self, head: str) -> ev.CheckRan:
        """The operator's check on a clean checkout of the packed head, in a container like the agent's: the
        same image and limits, the network through the proxy only. Its egress is on record like the agent's."""
        self.ui.phase("check", f"`{self.spec.check}` on {head[:12]}")
        check_dir = self.run_dir / "check"
        quota.mount(check_dir, self.quota)
        if self.chown:
            os.chown(check_dir, *self.chown)
        self._start(self.recipes.check(head, CHECK_TIMEOUT), command=["check", self.spec.check or ""])
        deadline = time.monotonic() + CHECK_TIMEOUT + 30
        info = self.handle.status("check")
        while info.running and time.monotonic() < deadline and self._cancel is None:
            info = self.handle.wait("check", 1.0)
        if self._cancel is not None and info.running:
            # The work is packed already: stop the check and still bring the work home.
            self._record(
                ev.LimitHit(
                    limit=self._cancel[0], reason=self._cancel[0], message=f"{self._cancel[1]} during the check"
                )
            )
            self.handle.stop("check", 1)
            check = ev.CheckRan(exit_code=130, head=head, interrupted=True, output="the check was interrupted")
            self._record(check)
            return check
        if info.running:
            self.handle.stop("check", 1)
        self._settle_gateway(self.state)  # the check's egress lines
        try:
            output = str(read_result(check_dir / "result.json").get("output", ""))[-4000:]
        except (OSError, ValueError):
            output = f"the check wrote no result: {self._tail('check')}"
        self.handle.discard("check", "sidecar", network=True)
        # The verdict is check.sh's exit status, from the engine: the result file lies in a directory the checked
        # code can write, so it is read for the output alone.
        check = ev.CheckRan(head=head, output=output, exit_code=info.exit_code if info.exit_code is not None else 125)
        self._record(check)
        return check

    def _diffstat(self, imported: Imported) -> list[ev.FileStat]:
        if not imported.head:
            return []
        out = git.Git(self.repo.path).diff("--numstat", "--no-renames", self.spec.base_commit, imported.head)
        rows = []
        for line in out.splitlines():
            added, deleted, path = line.split("\t", 2)
            rows.append(
                ev.FileStat(
                    path=path,
                    added=None if added == "-" else int(added),
                    deleted=None if deleted == "-" else int(deleted),
                )
            )
        return rows
