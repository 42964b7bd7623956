"""The task's checkout and the way the agent's work comes back.

The checkout is a fresh repository in the run directory whose object store borrows the host repository's
objects through `objects/info/alternates`: nothing is copied but the files of one working tree. Inside the
container the host's object directory is mounted read-only, so the agent can read history but cannot
write a single byte of the host's `.git`. Where the supervisor can mount an overlay, the files are not written
per run at all: the run's workspace is a copy-on-write layer over the commit's tree, written once into a cache
(git/trees.py, run/workspace.py); `prepare_checkout` is the full checkout used elsewhere.

The work comes back as a git bundle written by the finaliser. The host verifies it and fetches exactly one
ref from it, `refs/heads/sandbox/<run-id>`, with object checks on. The host never runs git inside the
workspace, whose config, hooks and attributes the agent controls.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import git

from agent_sandbox.errors import SandboxError, UsageError

log = logging.getLogger(__name__)

CONTAINER_OBJECTS = "/sandbox/host-objects"

# Applied to every host-side git command that touches what the agent produced.
HARDENED = [
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "transfer.fsckObjects=true",
    "-c",
    "fetch.fsckObjects=true",
    "-c",
    "protocol.allow=never",
    "-c",
    "protocol.file.allow=always",
]


@dataclass(frozen=True)
class HostRepo:
    """A validated host repository."""

    path: Path  # top of the working tree (or the git dir of a bare repository)
    git_dir: Path  # the common git dir: shared by all worktrees
    objects: Path


def open_repo(path: str | Path) -> HostRepo:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"repository path does not exist: {p}")
    if not p.is_dir():
        raise UsageError(f"not a directory: {p}")
    try:
        repo = git.Repo(p, search_parent_directories=False)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise UsageError(
            f"not a git repository: {p}", hint="point --repo at the top of a git checkout (the folder that holds .git)"
        ) from None
    common = Path(repo.git.rev_parse("--git-common-dir"))
    if not common.is_absolute():
        common = (p / common).resolve()
    top = Path(repo.working_tree_dir).resolve() if repo.working_tree_dir else common
    if not repo.bare and top != p.resolve():
        raise UsageError(f"{p} is inside the repository at {top}; pass the top of the checkout")
    objects = common / "objects"
    if (objects / "info" / "alternates").is_file():
        raise UsageError(
            f"{p} borrows objects from another repository (objects/info/alternates); "
            "the sandbox needs a repository that owns its objects"
        )
    return HostRepo(path=top, git_dir=common, objects=objects)


def resolve_commit(repo: HostRepo, ref: str) -> str:
    try:
        return git.Git(repo.path).rev_parse("--verify", "--end-of-options", f"{ref}^{{commit}}")
    except git.GitCommandError:
        raise UsageError(f"{ref!r} does not name a commit in {repo.path}") from None


def prepare_checkout(repo: HostRepo, base_commit: str, dest: Path, branch: str, owner: tuple[int, int] | None) -> None:
    """Create the workspace at dest (new, or an empty directory such as a fresh quota filesystem): branch at
    base_commit, working tree checked out, objects borrowed."""
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise SandboxError(f"the workspace {dest} is not empty")
    g = git.Git(dest)
    g.init("-q", "--initial-branch", "sandbox-init")
    alternates = dest / ".git" / "objects" / "info" / "alternates"
    alternates.write_text(f"{repo.objects}\n")
    g.update_ref(f"refs/heads/{branch}", base_commit)
    g.symbolic_ref("HEAD", f"refs/heads/{branch}")
    g.reset("-q", "--hard")
    # From here on the path that matters is the one inside the container.
    alternates.write_text(f"{CONTAINER_OBJECTS}\n")
    if owner is not None:
        uid, gid = owner
        for root, dirs, files in os.walk(dest):
            os.chown(root, uid, gid)
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)


@dataclass(frozen=True)
class Imported:
    """What the host took back."""

    branch: str | None  # the host branch, or None when the agent changed nothing
    head: str | None
    commits: list[str]  # new commits, oldest first


def import_bundle(
    repo: HostRepo, bundle: Path, branch: str, base_commit: str, replace: bool = False, into: str | None = None
) -> Imported:
    """Verify the bundle and fetch its one ref, refs/heads/<branch>, into refs/heads/<into or branch> of the host
    repository.

    replace lets it move an existing branch of that name (a sweep's branch, re-run the same day); without it
    an existing branch only moves forward (a follow-up's)."""
    ref = f"refs/heads/{branch}"
    target = f"refs/heads/{into or branch}"
    g = git.Git(repo.path)
    try:
        heads = g.execute(["git", *HARDENED, "bundle", "list-heads", str(bundle)]).splitlines()
    except git.GitCommandError as exc:
        raise SandboxError(f"the agent's bundle is unreadable: {exc.stderr.strip()[:300]}") from None
    names = {line.split(" ", 1)[1] for line in heads if " " in line}
    if names != {ref}:
        held = ", ".join(sorted(names)) or "none"
        raise SandboxError(f"the agent's bundle must hold exactly {ref}; it holds: {held}")
    try:
        g.execute(["git", *HARDENED, "bundle", "verify", "--quiet", str(bundle)])
        # Without replace, no '+': the branch is new, and a fetch that would overwrite one must fail.
        g.execute(
            [
                "git",
                *HARDENED,
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--no-recurse-submodules",
                str(bundle),
                f"{'+' if replace else ''}{ref}:{target}",
            ]
        )
    except git.GitCommandError as exc:
        raise SandboxError(f"importing the agent's work failed: {exc.stderr.strip()[:500]}") from None
    head = g.rev_parse("--verify", target)
    commits = g.rev_list("--reverse", f"{base_commit}..{head}").split()
    log.info("imported branch=%s head=%s commits=%d", into or branch, head, len(commits))
    return Imported(branch=into or branch, head=head, commits=commits)


def branch_exists(repo: HostRepo, branch: str) -> bool:
    try:
        git.Git(repo.path).rev_parse("--verify", "--quiet", f"refs/heads/{branch}")
        return True
    except git.GitCommandError:
        return False


def remove_tree(path: Path) -> None:
    """Remove a workspace, also when the agent left read-only or unreadable directories in it.

    The tree is the agent's, and may hold links to host paths (`/etc`, the operator's home). Nothing here
    follows a link: links are unlinked like files, and only directories of the tree itself ever have their
    mode changed, each opened with O_NOFOLLOW so that a link in its place is refused, never chmodded."""
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    # GNU rm removes links as entries, never descends through them, and walks by directory handles: a tree
    # nested deeper than a recursive walk survives (shutil.rmtree's RecursionError) is removed all the same.
    if _rm(path):
        return
    _open_up(path)
    if not _rm(path):
        raise SandboxError(f"could not remove {path}")


def _rm(path: Path) -> bool:
    return subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True).returncode == 0


def _chmod_dir(name: str, mode: int, dir_fd: int | None = None) -> None:
    """chmod the directory `name` itself, never what a link there points to (also without read access)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _open_up(top: Path) -> None:
    """Give the owner full access to every directory under top (top included), following no link."""
    stack = [str(top)]
    while stack:
        d = stack.pop()
        try:
            _chmod_dir(d, 0o700)
            fd = os.open(d, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            with os.scandir(fd) as entries:
                stack.extend(os.path.join(d, e.name) for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            pass
        finally:
            os.close(fd)
