"""`kvpilot modelserver` child processes for end-to-end tests: started on a free port, stopped."""

from __future__ import annotations

import re
import subprocess
import sys
import time

MODEL = "llama-3.1-8b"


def start_modelserver(
    time_scale: float = 50.0, *, gpu: str = "l4", model: str = MODEL
) -> tuple[subprocess.Popen[str], str]:
    """Start one on a port it picks; returns the process and its base URL from its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpilot", "modelserver", "--model", model, "--gpu", gpu,
         "--port", "0", "--time-scale", str(time_scale)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+?),", line)
        if m:
            return proc, m.group(1)  # stdout carries only this line; its logs go to stderr
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("modelserver did not start")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
