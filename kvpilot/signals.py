"""The shared vocabulary: what a GPU and a model-server replica look like to every component.

Plain frozen dataclasses with a JSON encoding that round-trips, so the agent can publish them,
the gateway and controller can read them, and the simulator can make them without any I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

ROLES = ("both", "prefill", "decode")
ENGINES = ("vllm", "sglang", "tgi", "trtllm", "kvpilot", "unknown")


@dataclass(frozen=True)
class GpuStats:
    """One GPU (or MIG instance) as NVML sees it."""

    uuid: str
    index: int
    name: str
    hbm_used_bytes: int
    hbm_total_bytes: int
    util: float  # duty cycle, 0-1: share of time a kernel was running
    mem_bw_util: float  # 0-1: share of time device memory was being read or written
    sm_active: float | None = None  # 0-1, from NVML GPM where the GPU reports it (Hopper+)
    power_w: float | None = None
    temp_c: float | None = None
    sm_clock_mhz: int | None = None
    mig_instance: str | None = None  # MIG GPU instance id, when this is a MIG slice
    healthy: bool = True  # False when NVML failed on this device (lost, not supported)
    error: str | None = None

    @property
    def hbm_free_bytes(self) -> int:
        return max(0, self.hbm_total_bytes - self.hbm_used_bytes)


@dataclass(frozen=True)
class ReplicaState:
    """One model-server replica, fused from its metrics and the GPUs under it."""

    replica_id: str  # namespace/pod in Kubernetes, the endpoint URL outside it
    address: str  # base URL, e.g. http://10.0.0.7:8000
    pool: str
    models: tuple[str, ...] = ()
    engine: str = "unknown"  # one of ENGINES
    node: str = ""
    accelerator: str = ""  # GKE accelerator label, e.g. nvidia-l4
    role: str = "both"  # one of ROLES
    gpus: tuple[GpuStats, ...] = ()
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # 0-1
    kv_blocks_total: int = 0
    kv_block_size: int = 16
    prefix_cache_hit_ratio: float = 0.0  # 0-1, recent
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    ttft_s: float | None = None  # recent mean time to first token
    tpot_s: float | None = None  # recent mean time per output token
    preemptions_total: int = 0
    lora_adapters: tuple[str, ...] = ()
    observed_at: float = 0.0  # unix seconds when the metrics were read
    healthy: bool = True  # False once the replica stopped answering for longer than allowed

    @property
    def kv_blocks_free(self) -> int:
        return int(round(self.kv_blocks_total * (1.0 - self.kv_usage)))

    def age(self, now: float) -> float:
        return max(0.0, now - self.observed_at)


@dataclass(frozen=True)
class NodeState:
    """Everything one agent knows: the node's GPUs and the replicas on it."""

    node: str
    observed_at: float
    gpus: tuple[GpuStats, ...] = ()
    replicas: tuple[ReplicaState, ...] = field(default_factory=tuple)


T = TypeVar("T")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def to_json(obj: Any) -> bytes:
    return orjson.dumps(obj)  # orjson serialises dataclasses natively


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a signal dataclass from its dict form, restoring nested dataclasses and tuples.

    Unknown keys are ignored so that a newer agent can talk to an older gateway.
    """
    kwargs = {}
    for name, decode in _field_decoders(cls):
        if name in data:
            value = data[name]
            kwargs[name] = value if decode is None or value is None else decode(value)
    return cls(**kwargs)


@functools.cache
def _field_decoders(cls: type) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """Per class, once: each field's name and how to decode it (None: JSON value as is).

    States arrive several times a second with dozens of objects; walking type hints per object
    would cost milliseconds, so the walk happens once per class.
    """
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _decoder(hints[f.name])) for f in dataclasses.fields(cls))


def _decoder(tp: Any) -> Callable[[Any], Any] | None:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decoder(args[0]) if len(args) == 1 else None
    if origin is tuple:
        item = _decoder(typing.get_args(tp)[0])
        if item is None:
            return tuple
        return lambda v: tuple(item(x) for x in v)
    if dataclasses.is_dataclass(tp):
        return functools.partial(from_dict, tp)
    if tp is float:
        return float
    return None


def from_json(cls: type[T], raw: bytes | str) -> T:
    return from_dict(cls, orjson.loads(raw))
