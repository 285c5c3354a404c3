"""`kvpilot plan` end to end through the one command line."""

from __future__ import annotations

import json

import pytest

from kvpilot.cli import main


def test_plan_json_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-70b", "--dtype", "bf16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    keys = {"gpu", "count", "dtype", "fits", "max_batch", "output_tok_s"}
    keys |= {"usd_per_million_output_tokens", "machine_type"}
    assert all(keys <= set(r) for r in rows)
    by = {(r["gpu"], r["count"]): r for r in rows}
    assert not by["h100", 1]["fits"] and by["h100", 4]["fits"]
    assert by["h100", 8]["machine_type"] == "a3-highgpu-8g"
    assert by["h200", 8]["machine_type"] == "a3-ultragpu-8g"
    assert by["a100-80gb", 4]["machine_type"] == "a2-ultragpu-4g"
    assert rows[0]["fits"] and rows[0]["usd_per_million_output_tokens"] > 0


def test_plan_table_with_targets_and_advice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "gemma-2-27b", "--dtype", "bf16", "--tpot-target", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "gemma-2-27b" in out and "a2-ultragpu-1g" in out
    assert "Quantization:" in out and "int4" in out


def test_plan_errors_are_clear(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-8b", "--prices", str(tmp_path / "nope.yaml")]) == 2
