"""Run an agent: in this process (tests, the demo) or as a child process.

    async with running_agent(cfg) as url: ...           # in-process, on cfg.agent.listen
    proc = spawn_agent(config_path)                      # `kvpilot agent --config ...`

`agent_config(...)` builds the Config for a set of local modelserver endpoints, which is what
`make demo` needs for each emulated node.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from agent.app import build_app
from agent.gpus import GpuSource
from kvpilot.config import AgentConfig, Config, PoolConfig, parse_listen


def agent_config(
    endpoints: Sequence[str],
    *,
    listen: str = "127.0.0.1:0",
    pool: str = "default",
    models: Sequence[str] = ("llama-3.1-8b",),
    node: str = "node-0",
    engine: str = "kvpilot",
    gpus: str = "emulated",
    scrape_interval_s: float = 0.25,
) -> Config:
    return Config(
        pools=(
            PoolConfig(
                name=pool,
                models=tuple(models),
                endpoints=tuple(endpoints),
                engine=engine,  # type: ignore[arg-type]
            ),
        ),
        agent=AgentConfig(
            listen=listen,
            gpus=gpus,  # type: ignore[arg-type]
            node_name=node,
            scrape_interval_s=scrape_interval_s,
        ),
    )


@contextlib.asynccontextmanager
async def running_agent(
    cfg: Config, *, gpu_source: GpuSource | None = None, kube_api: object = None
) -> AsyncIterator[str]:
    """Serve an agent on cfg.agent.listen (port 0 picks a free one); yields its base URL."""
    app = build_app(cfg, gpu_source=gpu_source, kube_api=kube_api)
    runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    host, port = parse_listen(cfg.agent.listen)
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        sockets = site._server.sockets  # type: ignore[union-attr]
        real_port = sockets[0].getsockname()[1]
        yield f"http://{host}:{real_port}"
    finally:
        await runner.cleanup()


def spawn_agent(config_path: str, *, log_path: str | None = None) -> subprocess.Popen[bytes]:
    """`kvpilot agent --config config_path` as a child process (the caller stops it)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "kvpilot", "agent", "--config", config_path],
        stdout=out,
        stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
