"""Fleet specifications: which replicas, on which GPUs, serving which model.

On the command line: ``8xl4`` (eight L4 replicas), ``6xl4+2xh100`` (a mixed fleet), ``2xh100*2``
(two replicas of two H100s each, tensor parallel); the model defaults to Llama-3.1-8B. Or a small
YAML file::

    model: llama-3.1-8b
    replicas:
      - {gpu: l4, count: 6}
      - {gpu: h100, count: 2, num_gpus: 1}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_MODEL = "llama-3.1-8b"


@dataclass(frozen=True)
class ReplicaSpec:
    gpu: str  # GPU alias, e.g. "l4"
    model: str = DEFAULT_MODEL
    num_gpus: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192

    @property
    def kind(self) -> str:
        """Replicas of one kind behave alike (the load calibration measures each kind once)."""
        tp = f"*{self.num_gpus}" if self.num_gpus > 1 else ""
        return f"{self.gpu}{tp}:{self.model}:{self.max_num_seqs}:{self.max_num_batched_tokens}"


@dataclass(frozen=True)
class FleetSpec:
    name: str  # how results name it, e.g. "8xl4"
    replicas: tuple[ReplicaSpec, ...]


_TERM = re.compile(r"^(\d+)\s*x\s*([A-Za-z0-9.\-]+?)(?:\*(\d+))?$")


def parse_fleet(spec: str, model: str = DEFAULT_MODEL) -> FleetSpec:
    """A fleet from ``NxGPU[*TP]+...`` or from a YAML file path."""
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        return load_fleet_file(spec)
    replicas: list[ReplicaSpec] = []
    for term in spec.replace(" ", "").split("+"):
        m = _TERM.match(term)
        if not m:
            raise ValueError(
                f"fleet {spec!r}: {term!r} is not COUNTxGPU[*GPUS_PER_REPLICA], e.g. 8xl4 or 6xl4+2xh100"
            )
        replicas += [ReplicaSpec(_gpu(m[2]), model, int(m[3] or 1))] * int(m[1])
    _check(spec, replicas)
    return FleetSpec(spec, tuple(replicas))


def load_fleet_file(path: str | Path) -> FleetSpec:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("replicas"), list):
        raise ValueError(f"{path}: expected a mapping with a 'replicas' list")
    model = str(data.get("model", DEFAULT_MODEL))
    replicas: list[ReplicaSpec] = []
    for i, item in enumerate(data["replicas"]):
        if not isinstance(item, dict) or "gpu" not in item:
            raise ValueError(f"{path}: replicas[{i}]: expected a mapping with 'gpu'")
        unknown = set(item) - {
            "gpu",
            "count",
            "model",
            "num_gpus",
            "max_num_seqs",
            "max_num_batched_tokens",
        }
        if unknown:
            raise ValueError(f"{path}: replicas[{i}].{sorted(unknown)[0]}: unknown key")
        spec = ReplicaSpec(
            _gpu(str(item["gpu"])),
            str(item.get("model", model)),
            int(item.get("num_gpus", 1)),
            int(item.get("max_num_seqs", 256)),
            int(item.get("max_num_batched_tokens", 8192)),
        )
        replicas += [spec] * int(item.get("count", 1))
    _check(str(path), replicas)
    return FleetSpec(str(data.get("name", Path(path).stem)), tuple(replicas))


def _gpu(name: str) -> str:
    from modelserver.profiles import resolve_gpu

    return resolve_gpu(name).alias


def _check(where: str, replicas: list[ReplicaSpec]) -> None:
    from modelserver.profiles import resolve_model

    if not replicas:
        raise ValueError(f"fleet {where!r}: no replicas")
    for r in replicas:
        resolve_model(r.model)
        if r.num_gpus < 1:
            raise ValueError(f"fleet {where!r}: num_gpus must be >= 1")
