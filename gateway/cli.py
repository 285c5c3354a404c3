"""`kvpilot gateway --config kvpilot.yaml`: serve http://HOST:PORT/v1 for any OpenAI client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kvpilot.config import Config, load_or_exit, watch_config


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvpilot gateway", description=__doc__)
    ap.add_argument("--config", required=True, help="kvpilot.yaml")
    ap.add_argument("--listen", default="", help="HOST:PORT, overrides gateway.listen")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_or_exit(args.config)
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_loop_factory()) as r:
        r.run(serve(cfg, args.config, args.listen))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (a much cheaper event loop for a proxy), else the standard one."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def serve(cfg: Config, path: str, listen: str = "") -> None:
    from gateway.app import GATEWAY, apply_config, start_gateway
    from kvpilot.config import parse_listen

    host, port = parse_listen(listen or cfg.gateway.listen)
    runner, url = await start_gateway(cfg, host=host, port=port)
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
        reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloader
        assert runner.app[GATEWAY] is not None
        await runner.cleanup()


def spawn(config_path: str | Path, listen: str = "") -> subprocess.Popen[bytes]:
    """Run the gateway as a child process (the demo's other hook); stop it with terminate()."""
    cmd = [sys.executable, "-m", "kvpilot.cli", "gateway", "--config", str(config_path)]
    if listen:
        cmd += ["--listen", listen]
    return subprocess.Popen(cmd)
