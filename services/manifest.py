"""What a run records for reproducibility: package version, git commit, library versions."""

from __future__ import annotations

import os
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


@cache
def package_version() -> str:
    try:
        return metadata.version("overparam")
    except metadata.PackageNotFoundError:
        return "unknown"


@cache
def git_commit() -> str | None:
    """HEAD of the source checkout the service runs from; in an image without git, the
    ``OVERPARAM_GIT_COMMIT`` it was built with; None when neither is known."""
    if os.environ.get("OVERPARAM_GIT_COMMIT"):
        return os.environ["OVERPARAM_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def base_manifest() -> dict[str, str | None]:
    return {"package_version": package_version(), "git_commit": git_commit()}
