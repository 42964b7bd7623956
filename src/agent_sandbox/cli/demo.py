"""`sandbox demo`: a throwaway repository with a failing test, and a scripted agent that fixes it."""

from __future__ import annotations

import time
from pathlib import Path

import git

CALC = '''"""A tiny calculator."""


def add(a: int, b: int) -> int:
    return a - b


def mul(a: int, b: int) -> int:
    return a * b
'''

TEST = """import unittest

from calc import add, mul


class CalcTest(unittest.TestCase):
    def test_add(self) -> None:
        self.assertEqual(add(2, 3), 5)

    def test_mul(self) -> None:
        self.assertEqual(mul(2, 3), 6)


if __name__ == "__main__":
    unittest.main()
"""

TASK = "The test suite fails. Find the bug in calc.py, fix it, and make sure `python3 -m unittest` passes."

SCRIPT = """# The scripted model's answers for the demo: run the tests, fix the bug, run them again, commit, report.
turns:
  - bash: "python3 -m unittest -v 2>&1 | tail -n 15"
  - edit: {path: calc.py, old: "return a - b", new: "return a + b"}
  - bash: "python3 -m unittest -v 2>&1 | tail -n 6"
  - bash: "git add calc.py && git commit -q -m 'Fix add(): it subtracted instead of adding' && git log --oneline -n 2"
  - write: {path: NOTES.md, content: "add() subtracted; fixed and covered by test_add.\\n"}
  - text: "Fixed `add()` in calc.py (it subtracted). `python3 -m unittest` passes now."
    usage: {input_tokens: 2400, output_tokens: 120}
usage: {input_tokens: 1800, output_tokens: 90}
"""


def make_demo_repo(parent: Path) -> tuple[Path, Path]:
    """Create the demo repository and the model script; returns (repo, script)."""
    root = parent / time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime())
    n = 0
    while root.exists():
        n += 1
        root = root.with_name(f"{root.name.split('.')[0]}.{n}")
    repo_dir = root / "repo"
    repo_dir.mkdir(parents=True)
    (repo_dir / "calc.py").write_text(CALC)
    (repo_dir / "test_calc.py").write_text(TEST)
    (repo_dir / ".gitignore").write_text("__pycache__/\n")
    repo = git.Repo.init(repo_dir, initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "demo user")
        cw.set_value("user", "email", "demo@example.invalid")
    repo.index.add(["calc.py", "test_calc.py", ".gitignore"])
    repo.index.commit("A calculator with a failing test")
    script = root / "script.yaml"
    script.write_text(SCRIPT)
    return repo_dir, script
