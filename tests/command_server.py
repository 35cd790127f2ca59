"""Run `python <args>` commands as processes forked from one interpreter that has already
imported the heavy libraries, so that each command skips their import (about 8 s of CPU each).

Started as `python command_server.py <request fd> <reply fd>` with the commands' environment and
folder. It imports `PRELOAD` (never ctseg: a command imports the ctseg of its own folder), then
reads one JSON request per line, `{"args": [...], "cwd": ..., "stdout": ..., "stderr": ...}`,
forks, replies with the child's pid, waits for it and replies with its exit status as
`subprocess` gives it (negative: killed by that signal). The child becomes the command: stdin
from /dev/null, stdout and stderr into the two files, `sys.argv`, `sys.path[0]` and
`__main__` as `python <args>` sets them; it ends as an interpreter ends (exit status of
`SystemExit`, 1 and the traceback for an uncaught exception, atexit handlers run).
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
from pathlib import Path

# Imported once by the server: about 8 s of CPU per interpreter (Lightning imports torch._dynamo).
PRELOAD = ("torch", "lightning", "lightning.pytorch", "monai", "hydra", "omegaconf", "nibabel")


def become(args: list[str], cwd: str, stdout: str, stderr: str) -> None:
    """In the forked child: run `python <args>` in `cwd`, its output into the two files."""
    os.chdir(cwd)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.orig_argv[:] = [sys.executable, *args]
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
        runpy.run_path(args[0], run_name="__main__")


def main() -> None:
    """Preload, then serve requests until the request pipe closes."""
    for name in PRELOAD:
        importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m == "ctseg" or m.startswith("ctseg."))
    if loaded:
        raise SystemExit(f"the preloaded libraries imported {loaded}: commands would not import "
                         "their own folder's ctseg")
    requests, replies = os.fdopen(int(sys.argv[1])), os.fdopen(int(sys.argv[2]), "w")
    for line in requests:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            become(job["args"], job["cwd"], job["stdout"], job["stderr"])
            sys.exit(0)
        replies.write(f"{pid}\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(f"{os.waitstatus_to_exitcode(status)}\n")
        replies.flush()


class CommandServer:
    """The client: a server started in `cwd` with `env`, running one command at a time."""

    def __init__(self, cwd: Path, env: dict[str, str], log: Path):
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, __file__, str(request_r), str(reply_w)], cwd=cwd, env=env,
                pass_fds=(request_r, reply_w), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        os.close(request_r)
        os.close(reply_w)
        self.requests, self.replies, self.log = os.fdopen(request_w, "w"), reply_r, log

    def reply(self, timeout: float | None) -> int | None:
        """The server's next reply line as an integer; None after `timeout` seconds."""
        line = b""
        while not line.endswith(b"\n"):
            if not select.select([self.replies], [], [], timeout)[0]:
                return None
            chunk = os.read(self.replies, 1)
            if not chunk:
                raise RuntimeError(f"the command server ended: {self.log.read_text()[-3000:]}")
            line += chunk
        return int(line)

    def run(self, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """`python <args>` in `cwd`, as subprocess.run(capture_output=True, text=True) gives it."""
        stdout, stderr = self.log.with_suffix(".stdout"), self.log.with_suffix(".stderr")
        self.requests.write(json.dumps({"args": args, "cwd": str(cwd), "stdout": str(stdout),
                                        "stderr": str(stderr)}) + "\n")
        self.requests.flush()
        pid = self.reply(None)
        status = self.reply(timeout)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            self.reply(None)
            raise subprocess.TimeoutExpired(["python", *args], timeout,
                                            stdout.read_text(errors="replace"))
        return subprocess.CompletedProcess(["python", *args], status,
                                           stdout.read_text(errors="replace"),
                                           stderr.read_text(errors="replace"))

    def close(self) -> None:
        """End the server (it ends when its request pipe closes)."""
        self.requests.close()
        os.close(self.replies)
        self.process.wait(timeout=60)


if __name__ == "__main__":
    main()
