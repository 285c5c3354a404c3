"""The gateway's part of kvpilot.yaml: keys that name URLs, pools, models and API keys are
checked at load, and the error names the key."""

from __future__ import annotations

from typing import Any

import pytest

from kvpilot.config import ConfigError, parse_config

POOLS = [
    {"name": "llama", "models": ["llama-3.1-8b"], "endpoints": ["http://127.0.0.1:9001"]},
    {"name": "qwen", "models": ["qwen-7b"], "endpoints": ["http://127.0.0.1:9002"]},
]


def gateway(**gw: Any) -> Any:
    return parse_config({"pools": POOLS, "gateway": gw})


@pytest.mark.parametrize(
    ("gw", "key"),
    [
        ({"api_keys": [""]}, "gateway.api_keys[0]"),
        ({"api_keys": ["k1", "  "]}, "gateway.api_keys[1]"),
        ({"agents": ["127.0.0.1:9100"]}, "gateway.agents[0]"),
        ({"agents": ["http://a:9100", "a:9100"]}, "gateway.agents[1]"),
        ({"services": {"lama": "llama-svc"}}, "gateway.services.lama"),
        ({"model_priority": {"gpt-4": 3}}, "gateway.model_priority.gpt-4"),
        ({"shutdown_timeout_s": -5}, "gateway.shutdown_timeout_s"),
    ],
)
def test_bad_gateway_keys_are_refused_by_name(gw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        gateway(**gw)
    assert str(info.value).startswith(f"{key}:")


def test_good_gateway_keys_pass() -> None:
    cfg = gateway(
        api_keys=["k1"],
        agents=["http://127.0.0.1:9100", "https://agents.kvpilot:9100"],
        services={"llama": "llama-svc"},
        model_priority={"qwen-7b": -1},
        shutdown_timeout_s=0,
    )
    assert cfg.gateway.services == {"llama": "llama-svc"}
    assert cfg.gateway.model_priority == {"qwen-7b": -1}


def test_a_model_two_pools_list_is_allowed_for_spill_over() -> None:
    pools = [*POOLS, {"name": "llama-b", "models": ["llama-3.1-8b"], "endpoints": ["http://b:1"]}]
    cfg = parse_config({"pools": pools})
    assert [p.name for p in cfg.pools if "llama-3.1-8b" in p.models] == ["llama", "llama-b"]
