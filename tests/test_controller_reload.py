"""A reload takes what a running controller can apply and names what needs a restart."""

from __future__ import annotations

from controller.cli import keep_restart_only
from kvpilot.config import parse_config

BASE = {
    "pools": [{"name": "llama", "models": ["llama-3.1-8b"], "accelerator": "nvidia-l4"}],
    "gateway": {"agents": ["http://agent-a:9400"]},
    "controller": {"interval_s": 15, "pools": {"llama": {"max_replicas": 4}}},
}


def edited(**controller: object) -> dict:
    return {**BASE, "controller": {**BASE["controller"], **controller}}


def test_live_settings_are_taken_and_nothing_is_reported() -> None:
    old = parse_config(BASE)
    new = parse_config(edited(interval_s=5, dry_run=True, pools={"llama": {"max_replicas": 9}}))
    merged, restart = keep_restart_only(old, new)
    assert restart == []
    assert merged.controller.interval_s == 5 and merged.controller.dry_run
    assert merged.controller.pools["llama"].max_replicas == 9


def test_settings_read_at_start_are_kept_and_named() -> None:
    old = parse_config(BASE)
    new = parse_config(
        {
            **edited(node_actuator="placeholders", lease_duration_s=30, interval_s=5),
            "gateway": {"agents": ["http://agent-b:9400"]},
        }
    )
    merged, restart = keep_restart_only(old, new)
    assert restart == [
        "controller.node_actuator",
        "controller.lease_duration_s",
        "gateway.agents (the controller's agents)",
    ]
    assert merged.controller.node_actuator == "none"
    assert merged.controller.lease_duration_s == 15
    assert merged.controller.interval_s == 5  # the live part of the same edit still applies
