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


def test_plan_gpu_by_alias_or_label(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("H200", "nvidia-h200-141gb"):
        assert main(["plan", "--model", "llama-3.1-8b", "--gpu", name, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows and {(r["gpu"], r["count"]) for r in rows} == {("h200", 8)}


def test_plan_gpu_errors_name_the_valid_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu", "b200"]) == 2
    err = capsys.readouterr().err
    assert "b200" in err and "h100 (nvidia-h100-80gb)" in err and "l4" in err
    # H200 only comes as 8 GPUs: say so rather than print an empty table.
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu", "h200", "--count", "1"]) == 2
    assert "h200 comes as 8 GPUs" in capsys.readouterr().err


def test_plan_json_carries_the_quantization_advice(capsys: pytest.CaptureFixture[str]) -> None:
    """Rows stay a list; the row the advice recommends says so, and the rows at the format it is
    about carry the sentence the table prints."""
    args = ["plan", "--model", "gemma-2-27b", "--tpot-target", "0.05", "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list)
    assert all(isinstance(r["recommended"], bool) and isinstance(r["advice"], str) for r in rows)
    rec = [r for r in rows if r["recommended"]]
    assert len(rec) == 1 and rec[0]["dtype"] == "int4" and rec[0]["gpu"] == "l4"
    advice = rec[0]["advice"]
    assert "int4" in advice and "instead of" in advice
    assert all(r["advice"] == advice for r in rows if r["dtype"] == "bf16")
    assert all(r["advice"] == "" for r in rows if r["dtype"] in ("fp8", "int8"))
    # Only bf16 rows asked for: the advice is still there, on them.
    assert main([*args, "--dtype", "bf16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert not any(r["recommended"] for r in rows)
    assert all(r["advice"] == advice for r in rows)
    # Nothing to recommend: no row recommended, no advice.
    assert main(["plan", "--model", "llama-3.1-8b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert not any(r["recommended"] or r["advice"] for r in rows)
