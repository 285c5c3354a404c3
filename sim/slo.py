"""Service-level targets per workload: what "a request met its SLO" means in every result.

A request meets the SLO when its time to first token is within ``ttft_s + ttft_per_1k_s x prompt
tokens / 1000`` (a long document may take longer to read) and its mean time per output token
(after the first) is within ``tpot_s``. Defaults are set for Llama-3.1-8B on the slowest GPU in the
standard fleets (L4): a few times the unloaded latency, so they bind under load, not at rest.
Override with a YAML file: ``{workload: {ttft_s: 1.0, ttft_per_1k_s: 0.3, tpot_s: 0.15}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Slo:
    ttft_s: float  # time-to-first-token budget for an empty prompt
    ttft_per_1k_s: float  # extra budget per 1,000 prompt tokens
    tpot_s: float  # mean time per output token after the first
    min_ratio: float = 0.9  # share of requests that must meet both for "capacity at SLO"

    def ttft_target(self, prompt_tokens: int) -> float:
        return self.ttft_s + self.ttft_per_1k_s * prompt_tokens / 1000.0

    def describe(self) -> str:
        grow = f" + {self.ttft_per_1k_s:g} s per 1k prompt tokens" if self.ttft_per_1k_s else ""
        return (
            f"TTFT <= {self.ttft_s:g} s{grow}, TPOT <= {self.tpot_s * 1000:g} ms, "
            f"for >= {self.min_ratio:.0%} of requests"
        )


DEFAULT_SLOS: dict[str, Slo] = {
    "sharegpt": Slo(ttft_s=1.0, ttft_per_1k_s=0.5, tpot_s=0.1),
    "prefill-heavy": Slo(ttft_s=1.5, ttft_per_1k_s=0.5, tpot_s=0.15),
    "decode-heavy": Slo(ttft_s=1.0, ttft_per_1k_s=0.5, tpot_s=0.1),
    "shared-prefix": Slo(ttft_s=1.0, ttft_per_1k_s=0.5, tpot_s=0.1),
    "mixed-bursty": Slo(ttft_s=1.0, ttft_per_1k_s=0.5, tpot_s=0.15),
    "azure": Slo(ttft_s=1.0, ttft_per_1k_s=0.5, tpot_s=0.15),
}


def slo_for(workload: str, overrides: dict[str, Slo] | None = None) -> Slo:
    if overrides and workload in overrides:
        return overrides[workload]
    return DEFAULT_SLOS.get(workload, DEFAULT_SLOS["sharegpt"])


def load_slos(path: str | Path) -> dict[str, Slo]:
    """Per-workload overrides; a workload's missing keys keep their defaults."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of workload -> targets")
    names = {f.name for f in fields(Slo)}
    out: dict[str, Slo] = {}
    for workload, keys in data.items():
        if not isinstance(keys, dict):
            raise ValueError(f"{path}: {workload}: expected a mapping of targets")
        bad = set(keys) - names
        if bad:
            raise ValueError(
                f"{path}: {workload}.{sorted(bad)[0]}: unknown key; expected one of {sorted(names)}"
            )
        out[str(workload)] = replace(
            slo_for(str(workload)), **{k: float(v) for k, v in keys.items()}
        )
    return out
