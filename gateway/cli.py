"""`kvpilot gateway --config kvpilot.yaml`: serve http://HOST:PORT/v1 for any OpenAI client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from gateway.peers import ENV_DIR as PEERS_ENV_DIR
from gateway.peers import create_file as create_peer_file
from kvpilot.config import Config, load_or_exit, watch_config
from kvpilot.cpus import available_cpus
from kvpilot.tasks import cancel_and_wait


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvpilot gateway", description=__doc__)
    ap.add_argument("--config", required=True, help="kvpilot.yaml")
    ap.add_argument("--listen", default="", help="HOST:PORT, overrides gateway.listen")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)  # set by supervise
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_or_exit(args.config)
    workers = cfg.gateway.workers or min(64, available_cpus())
    if workers > 1 and args.worker < 0:
        return supervise(cfg, args.config, args.listen, args.log_level, workers)
    if args.worker >= 0:
        from gateway.metrics import pin_worker_pid

        pin_worker_pid()
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_loop_factory()) as r:
        r.run(serve(cfg, args.config, args.listen, worker=args.worker))
    return 0


def supervise(cfg: Config, path: str, listen: str, log_level: str, workers: int) -> int:
    """Run `workers` processes on one port (SO_REUSEPORT: the kernel spreads connections).

    One Python process is one core; workers multiply the proxy's throughput. Each worker has its
    own in-flight account and sees the same replica states (agents, scrapes); /metrics from any
    worker reports all of them (prometheus-client's multiprocess mode). A worker that exits stops
    the others and the supervisor exits with its status, so the pod restarts whole.
    """
    from kvpilot.config import parse_listen

    host, port = parse_listen(listen or cfg.gateway.listen)
    # Hold the port (bound, not listening) so that port 0 resolves once for every worker.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
    bound = holder.getsockname()[1]
    prom_dir = tempfile.mkdtemp(prefix="kvpilot-gateway-metrics-")
    peers_dir = tempfile.mkdtemp(prefix="kvpilot-gateway-peers-")  # shared in-flight totals
    for i in range(workers):
        create_peer_file(Path(peers_dir), i)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": prom_dir, PEERS_ENV_DIR: peers_dir}
    shown = "[" + host + "]" if ":" in host else host
    cmd = [sys.executable, "-m", "kvpilot.cli", "gateway", "--config", str(path)]
    cmd += ["--listen", f"{shown}:{bound}", "--log-level", log_level]
    procs = [subprocess.Popen([*cmd, "--worker", str(i)], env=env) for i in range(workers)]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while True:
            pid, status = os.wait()
            done = next((p for p in procs if p.pid == pid), None)
            if done is not None:
                done.returncode = os.waitstatus_to_exitcode(status)
                if not stopping:
                    logging.error("gateway worker %d exited with %d", pid, done.returncode)
                    code = code or done.returncode or 1
                    stop()
            if all(p.returncode is not None for p in procs):
                break
    except ChildProcessError:
        pass
    finally:
        holder.close()
        shutil.rmtree(prom_dir, ignore_errors=True)
        shutil.rmtree(peers_dir, ignore_errors=True)
    return code


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (a much cheaper event loop for a proxy), else the standard one."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def serve(cfg: Config, path: str, listen: str = "", *, worker: int = -1) -> None:
    """Serve until SIGTERM/SIGINT; `worker` >= 0: one of the supervisor's worker processes."""
    from gateway.app import GATEWAY, apply_config, start_gateway
    from kvpilot.config import parse_listen

    host, port = parse_listen(listen or cfg.gateway.listen)
    runner, url = await start_gateway(
        cfg, host=host, port=port, reuse_port=worker >= 0, worker=worker
    )
    print(f"kvpilot gateway serving {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    async def reload() -> None:
        async for new in watch_config(path, cfg):
            await apply_config(runner.app, new)

    reloader = asyncio.create_task(reload())
    try:
        await stop.wait()
    finally:
        await cancel_and_wait(reloader)
        assert runner.app[GATEWAY] is not None
        await runner.cleanup()


def spawn(config_path: str | Path, listen: str = "") -> subprocess.Popen[bytes]:
    """Run the gateway as a child process (the demo's other hook); stop it with terminate()."""
    cmd = [sys.executable, "-m", "kvpilot.cli", "gateway", "--config", str(config_path)]
    if listen:
        cmd += ["--listen", listen]
    return subprocess.Popen(cmd)
