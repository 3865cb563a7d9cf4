#!/usr/bin/env python3
"""One-command set-up: create ``.venv``, install overparam into it, then run a command.

    python3 bootstrap.py serve [--host H --port P]   # the service on SQLite + local Ray
    python3 bootstrap.py test [pytest args]          # the tests but the slow subset
    python3 bootstrap.py test -m slow -n 0           # only the slow subset (-m "": all)

Needs only Python ≥ 3.11 with pip. Re-runs skip the install while pyproject.toml is unchanged.
``OVERPARAM_TORCH`` chooses the torch requirement (default ``torch==2.13.0``, the CPU build;
set e.g. ``torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128`` on GPU hosts).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def _install(extras: str) -> None:
    torch_req = os.environ.get("OVERPARAM_TORCH", "torch==2.13.0")
    fingerprint = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + extras.encode() + torch_req.encode()
    ).hexdigest()
    stamp = VENV / ".bootstrap-stamp"
    if stamp.exists() and stamp.read_text() == fingerprint:
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print(
        f"installing {torch_req} and overparam[{extras}] into {VENV} (first run only)", flush=True
    )
    # torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
    subprocess.run([*pip, *shlex.split(torch_req)], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[{extras}]" if extras else str(ROOT)], check=True)
    stamp.write_text(fingerprint)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "test", "install"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    _install("dev")
    os.chdir(ROOT)
    if command == "serve":
        args = [str(BIN / "overparam"), "serve", *rest]
    elif command == "test":
        args = [str(BIN / "python"), "-m", "pytest", *rest]
    else:
        return 0
    os.execv(args[0], args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
