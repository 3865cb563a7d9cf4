#!/usr/bin/env python3
"""One-command set-up: create ``.venv``, install overparam into it, then run a command.

It installs both distributions of this repository, editable: ``overparam`` (client/: the
Python client and CLI) and ``overparam-server`` (the root: api, services, worker, migrations),
with the ``dev`` dependency group (PEP 735; pip >= 25.1 reads it, so pip is upgraded first).

    python3 bootstrap.py serve [--host H --port P]   # the service on SQLite + local Ray
    python3 bootstrap.py test [pytest args]          # the tests but the slow subset
    python3 bootstrap.py test -m slow -n 0           # only the slow subset (-m "": all)
    python3 bootstrap.py install                     # only the set-up

Needs only Python ≥ 3.11 with pip. Re-runs skip the install while both pyproject.toml files
(the root's, client/'s) are unchanged.
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


PIP_WITH_GROUPS = "pip>=25.1"  # `pip install --group` (PEP 735 dependency groups)


def _install(group: str) -> None:
    torch_req = os.environ.get("OVERPARAM_TORCH", "torch==2.13.0")
    fingerprint = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes()
        + (ROOT / "client" / "pyproject.toml").read_bytes()
        + group.encode()
        + torch_req.encode()
    ).hexdigest()
    stamp = VENV / ".bootstrap-stamp"
    if stamp.exists() and stamp.read_text() == fingerprint:
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print(
        f"installing {torch_req}, overparam (client), overparam-server and the {group!r} group "
        f"into {VENV} (first run only)",
        flush=True,
    )
    subprocess.run([*pip, PIP_WITH_GROUPS], check=True)
    # torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
    subprocess.run([*pip, *shlex.split(torch_req)], check=True)
    # Both in one resolution: the server's requirement `overparam==…` is the local client.
    groups = ["--group", f"{ROOT / 'pyproject.toml'}:{group}"] if group else []
    subprocess.run([*pip, "-e", str(ROOT / "client"), "-e", str(ROOT), *groups], check=True)
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
