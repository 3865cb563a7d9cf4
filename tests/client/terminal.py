"""A command on a pseudo-terminal of a given size, as a user's shell runs it: ``expect`` reads
until a text shows up (ANSI escapes removed); ``close`` waits for the exit code."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CLI = (sys.executable, "-m", "overparam.cli")  # this venv's (bootstrap: the checkout, editable)


class Terminal:
    def __init__(self, *args: str, columns: int = 160, lines: int = 40) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        env = os.environ | {"COLUMNS": str(columns), "LINES": str(lines), "TERM": "xterm-256color"}
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        self.master = master
        self.raw = ""
        self.text = ""

    def _read(self) -> bool:
        """Read what the command wrote in the last 0.1 s; False once it exited and all is read."""
        ready, _, _ = select.select([self.master], [], [], 0.1)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536).decode(errors="replace")
        except OSError:  # the command exited and the terminal closed
            chunk = ""
        self.raw += chunk
        self.text += ANSI.sub("", chunk)
        return bool(chunk) or self.process.poll() is None

    def expect(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout  # bounds a hang; never decides a pass
        while needle not in self.text:
            assert time.monotonic() < deadline, f"never saw {needle!r} in:\n{self.text[-3000:]}"
            if not self._read():
                assert needle in self.text, f"exited without {needle!r}:\n{self.text[-3000:]}"

    def read_to_end(self, timeout: float = 60.0) -> str:
        """Everything the command writes until it exits."""
        deadline = time.monotonic() + timeout
        while self._read():
            assert time.monotonic() < deadline, f"still running:\n{self.text[-3000:]}"
        return self.text

    def close(self) -> int:
        code = self.process.wait(timeout=30)
        os.close(self.master)
        return code


def run_in_terminal(*args: str, columns: int) -> str:
    """The whole output of a command that exits 0, on a terminal ``columns`` wide."""
    terminal = Terminal(*args, columns=columns)
    try:
        terminal.read_to_end()
    finally:
        code = terminal.close()
    assert code == 0, terminal.text[-3000:]
    return terminal.text
