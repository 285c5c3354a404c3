"""controller.mode: local starts and stops real `kvpilot modelserver` processes; bad configs."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest

from controller.local import LocalActuator
from controller.loop import Controller, targets
from kvpilot.cli import main
from kvpilot.config import parse_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def healthy(url: str, session: aiohttp.ClientSession, deadline_s: float = 30.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        try:
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return True
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    return False


async def test_local_mode_starts_min_replicas_and_stops_them() -> None:
    ports = [free_port(), free_port()]
    cfg = parse_config(
        {
            "pools": [
                {
                    "name": "llama",
                    "models": ["llama-3.1-8b"],
                    "endpoints": [f"http://127.0.0.1:{p}" for p in ports],
                }
            ],
            "controller": {"mode": "local", "pools": {"llama": {"min_replicas": 1}}},
        }
    )
    act = LocalActuator(gpu="l4", time_scale=50)
    ctl = Controller(cfg, act, lambda: [], clock=lambda: 1000.0)
    try:
        d = (await ctl.tick())["llama"]
        assert (d.current, d.desired) == (0, 1)
        assert (await act.get_size(targets(cfg)[0])).replicas == 1
        async with aiohttp.ClientSession() as s:
            assert await healthy(f"http://127.0.0.1:{ports[0]}", s)
            t = targets(cfg)[0]
            # Capped at the endpoints configured, or already there: nothing done, said so.
            assert not await act.set_replicas(t, 1)
            assert await act.set_replicas(t, 0)
            assert (await act.get_size(t)).replicas == 0
            assert not await act.set_replicas(t, 0)
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{ports[0]}/health") as r:
                    await r.read()
    finally:
        await act.close()


def test_bad_controller_config_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "kvpilot.yaml"
    f.write_text(
        "pools:\n  - name: llama\n    models: [m]\n"
        "controller:\n  pools:\n    llama: {min_replicas: 5, max_replicas: 2}\n"
    )
    with pytest.raises(SystemExit) as e:
        main(["controller", "--config", str(f)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "controller.pools.llama" in err and "max_replicas" in err
    f.write_text("pools:\n  - name: llama\n    models: [m]\ncontroller:\n  pools:\n    other: {}\n")
    with pytest.raises(SystemExit):
        main(["controller", "--config", str(f)])
    assert "no pool named 'other'" in capsys.readouterr().err


def test_reload_keeps_old_autoscaler_state_when_settings_are_unchanged() -> None:
    base = {"pools": [{"name": "llama", "models": ["m"]}], "controller": {"pools": {"llama": {}}}}
    ctl = Controller(parse_config(base), LocalActuator(), lambda: [])
    a = ctl.autoscalers["llama"]
    ctl.apply_config(
        parse_config({**base, "controller": {"pools": {"llama": {}}, "interval_s": 5}})
    )
    assert ctl.autoscalers["llama"] is a
    ctl.apply_config(
        parse_config({**base, "controller": {"pools": {"llama": {"max_replicas": 3}}}})
    )
    assert ctl.autoscalers["llama"] is not a
