import asyncio
import textwrap

import pytest

from kvpilot.config import (
    CONFIG_RELOADS,
    ConfigError,
    load_config,
    parse_config,
    watch_config,
)

SMALLEST = textwrap.dedent(
    """
    pools:
      - name: llama-8b
        models: [llama-3.1-8b]
        endpoints: [http://127.0.0.1:9001, http://127.0.0.1:9002]
    agent:
      listen: 127.0.0.1:9100
      gpus: emulated
    gateway:
      listen: 127.0.0.1:8080
      agents: [http://127.0.0.1:9100]
      policy: headroom
    controller:
      mode: local
    """
)


def test_design_doc_example_loads(tmp_path):
    p = tmp_path / "kvpilot.yaml"
    p.write_text(SMALLEST)
    cfg = load_config(p)
    assert cfg.pools[0].endpoints == ("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    assert cfg.agent.gpus == "emulated"
    assert cfg.gateway.policy == "headroom"
    assert cfg.controller.mode == "local"
    assert cfg.pool_for_model("llama-3.1-8b").name == "llama-8b"
    assert cfg.pool_for_model("other") is None


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("gateway: {policy: fastest}", "gateway.policy: 'fastest' is not one of"),
        ("agent: {gpus: cuda}", "agent.gpus: str 'cuda' is not one of ['nvml', 'emulated']"),
        ("agent: {scrape_interval_s: fast}", "agent.scrape_interval_s: str 'fast' is not a number"),
        ("agent: {scrape_interval_s: 0.001}", "agent.scrape_interval_s: 0.001 is out of range"),
        ("gateway: {listne: x}", "gateway.listne: unknown key"),
        ("gateway: {listen: localhost}", "gateway.listen: 'localhost' is not host:port"),
        ("pools: [{name: a}]", "pools[0].models: required key is missing"),
        ("pools: [{name: a, models: [m], endpoints: [127.0.0.1:1]}]", "pools[0].endpoints[0]"),
        ("pools: [{name: a, models: x}]", "pools[0].models: expected a list, got str 'x'"),
        (
            "agent: {dcgm_compatible_metrics: 1}",
            "agent.dcgm_compatible_metrics: int 1 is not a boolean",
        ),
        (
            "pools: [{name: a, models: [m]}, {name: a, models: [n]}]",
            "pools[1].name: 'a' is used by two pools",
        ),
        ("- just a list", "<top level>: expected a mapping"),
    ],
)
def test_errors_name_key_value_and_expectation(yaml_text, needle):
    import yaml

    with pytest.raises(ConfigError) as e:
        parse_config(yaml.safe_load(yaml_text))
    assert needle in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "k.yaml"
    p.write_text("pools: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_cli_exits_nonzero_naming_the_key(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "k.yaml"
    p.write_text("gateway: {policy: fastest}\n")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from kvpilot.config import load_or_exit; load_or_exit({str(p)!r})",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "gateway.policy" in out.stderr and "fastest" in out.stderr


async def test_watch_hands_out_new_valid_versions_and_refuses_bad_ones(tmp_path):
    p = tmp_path / "k.yaml"
    p.write_text(SMALLEST)
    first = load_config(p)
    errors: list[ConfigError] = []
    rejected_before = CONFIG_RELOADS.labels("rejected")._value.get()
    it = watch_config(p, first, interval_s=0.02, on_error=errors.append)

    async def next_version():
        return await asyncio.wait_for(it.__anext__(), 5)

    task = asyncio.create_task(next_version())
    await asyncio.sleep(0.1)
    p.write_text(SMALLEST.replace("policy: headroom", "policy: bogus"))  # refused
    await asyncio.sleep(0.1)
    assert errors and "gateway.policy" in str(errors[0])
    assert not task.done()  # the bad version was not handed out
    p.write_text(SMALLEST.replace("policy: headroom", "policy: gie"))
    new = await task
    assert new.gateway.policy == "gie"
    assert CONFIG_RELOADS.labels("rejected")._value.get() == rejected_before + 1
    await it.aclose()
