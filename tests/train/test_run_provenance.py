"""Run records name the code that produced them."""

import shutil
import subprocess
from pathlib import Path

import pytest

from melora.experiments.runs import git_commit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_git_commit_is_the_checkouts_head():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    commit = git_commit()
    assert commit is not None, "git_commit() found no repository: records would lose their provenance"
    assert commit.removesuffix("-dirty") == head
