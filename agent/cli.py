"""`kvpilot agent --config kvpilot.yaml`: the per-node agent."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal

from aiohttp import web

from agent.app import build_app
from kvpilot.config import (
    Config,
    ConfigError,
    load_or_exit,
    parse_config,
    parse_listen,
    watch_config,
)

log = logging.getLogger("kvpilot.agent")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvpilot agent", description=__doc__)
    p.add_argument("--config", required=True, help="kvpilot.yaml")
    p.add_argument("--listen", help="host:port, overrides agent.listen")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_or_exit(args.config)
    if args.listen:
        try:
            parse_config({"agent": {"listen": args.listen}})  # checked like the file's value
        except ConfigError as e:
            print(f"kvpilot agent: --listen: {e}", flush=True)
            return 2
        cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, listen=args.listen))
    if cfg.agent.gpus == "nvml":
        from agent.nvml import NvmlUnavailable

        try:
            import pynvml

            pynvml.nvmlInit()
            pynvml.nvmlShutdown()
        except Exception as e:
            print(f"kvpilot agent: agent.gpus is nvml but {NvmlUnavailable(e)}", flush=True)
            print("kvpilot agent: set agent.gpus: emulated to run without GPUs", flush=True)
            return 2
    asyncio.run(serve(args.config, cfg))
    return 0


async def serve(path: str, cfg: Config) -> None:
    """Serve until SIGTERM/SIGINT; a changed valid config restarts the agent with it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    while True:
        runner = web.AppRunner(build_app(cfg), shutdown_timeout=2.0, access_log=None)
        await runner.setup()
        host, port = parse_listen(cfg.agent.listen)
        await web.TCPSite(runner, host, port).start()
        log.info("agent listening on http://%s:%d", host, port)
        reload = asyncio.ensure_future(_next_config(path, cfg))
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({reload, stopped}, return_when=asyncio.FIRST_COMPLETED)
        await runner.cleanup()
        if stopped in done:
            reload.cancel()
            return
        stopped.cancel()
        cfg = reload.result()
        log.info("restarting the agent with the new configuration")


async def _next_config(path: str, cfg: Config) -> Config:
    async for new in watch_config(path, cfg):
        return new
    raise RuntimeError("config watch ended")  # pragma: no cover - watch_config never ends
