"""/metrics: the node's GPUs and replicas as Prometheus series, built from the latest NodeState.

`kvpilot_gpu_*` and `kvpilot_replica_*` families are generated at scrape time from what the hub
holds, so Prometheus sees exactly what the gateway and controller see. With
`agent.dcgm_compatible_metrics: true` the GPUs are also published under dcgm-exporter's names,
units and labels (`DCGM_FI_DEV_FB_USED` in MiB, `DCGM_FI_DEV_GPU_UTIL` in percent, labels gpu,
UUID, device, modelName, Hostname, and namespace/pod/container of the owning pod), so existing
GPU dashboards keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.hub import StateHub
from agent.owners import Owner
from kvpilot.signals import GpuStats, NodeState, ReplicaState

MIB = 1024 * 1024

_GPU_LABELS = ["gpu", "uuid", "model_name", "mig_instance", "node", "namespace", "pod"]
_GPU_FAMILIES: list[tuple[str, str, object]] = [
    ("kvpilot_gpu_memory_used_bytes", "GPU memory used (NVML v2).", lambda g: g.hbm_used_bytes),
    ("kvpilot_gpu_memory_total_bytes", "GPU memory in total.", lambda g: g.hbm_total_bytes),
    ("kvpilot_gpu_utilization_ratio", "Share of time a kernel ran (0-1).", lambda g: g.util),
    (
        "kvpilot_gpu_memory_bandwidth_utilization_ratio",
        "Share of time device memory was read or written (0-1).",
        lambda g: g.mem_bw_util,
    ),
    ("kvpilot_gpu_sm_active_ratio", "SM activity from NVML GPM (0-1).", lambda g: g.sm_active),
    ("kvpilot_gpu_power_watts", "Power draw.", lambda g: g.power_w),
    ("kvpilot_gpu_temperature_celsius", "GPU temperature.", lambda g: g.temp_c),
    (
        "kvpilot_gpu_sm_clock_hertz",
        "SM clock.",
        lambda g: None if g.sm_clock_mhz is None else g.sm_clock_mhz * 1e6,
    ),
    ("kvpilot_gpu_healthy", "1 when NVML reads the device, 0 after an error.", lambda g: g.healthy),
]

_REPLICA_LABELS = ["replica", "pool", "engine", "node", "accelerator", "role"]
_REPLICA_FAMILIES: list[tuple[str, str, object]] = [
    ("kvpilot_replica_requests_waiting", "Requests queued in the engine.", lambda r: r.waiting),
    ("kvpilot_replica_requests_running", "Requests in the running batch.", lambda r: r.running),
    ("kvpilot_replica_kv_cache_usage_ratio", "KV-cache usage (0-1).", lambda r: r.kv_usage),
    ("kvpilot_replica_kv_cache_blocks", "KV-cache blocks in total.", lambda r: r.kv_blocks_total),
    (
        "kvpilot_replica_prefix_cache_hit_ratio",
        "Recent prefix-cache hit ratio (0-1).",
        lambda r: r.prefix_cache_hit_ratio,
    ),
    (
        "kvpilot_replica_prompt_tokens_per_second",
        "Recent prompt (prefill) token rate.",
        lambda r: r.prompt_tokens_per_s,
    ),
    (
        "kvpilot_replica_generation_tokens_per_second",
        "Recent generated token rate.",
        lambda r: r.generation_tokens_per_s,
    ),
    ("kvpilot_replica_ttft_seconds", "Recent mean time to first token.", lambda r: r.ttft_s),
    ("kvpilot_replica_tpot_seconds", "Recent mean time per output token.", lambda r: r.tpot_s),
    ("kvpilot_replica_healthy", "1 while the replica answers, 0 once stale.", lambda r: r.healthy),
    (
        "kvpilot_replica_observed_timestamp_seconds",
        "When the replica's metrics were last read (unix time).",
        lambda r: r.observed_at,
    ),
]

# dcgm-exporter field name -> (help, value in dcgm's unit)
_DCGM: list[tuple[str, str, object]] = [
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", lambda g: g.hbm_used_bytes / MIB),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        lambda g: g.hbm_free_bytes / MIB,
    ),
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda g: round(g.util * 100)),
    (
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory utilization (in %).",
        lambda g: round(g.mem_bw_util * 100),
    ),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda g: g.power_w),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda g: g.temp_c),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", lambda g: g.sm_clock_mhz),
    (
        "DCGM_FI_PROF_SM_ACTIVE",
        "Ratio of cycles an SM has at least 1 warp assigned.",
        lambda g: g.sm_active,
    ),
    (
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "Ratio of cycles the device memory interface is active.",
        lambda g: g.mem_bw_util,
    ),
]
_DCGM_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname", "namespace", "pod", "container"]


class StateCollector(Collector):
    """A prometheus-client collector that renders the hub's latest NodeState."""

    def __init__(self, hub: StateHub, owners: object, dcgm: bool) -> None:
        self.hub = hub
        self.owners = owners  # callable -> dict[uuid, Owner]
        self.dcgm = dcgm

    def collect(self) -> Iterator[Metric]:
        state = self.hub.latest
        if state is None:
            return
        owners: dict[str, Owner] = self.owners()  # type: ignore[operator]
        yield from _gpu_families(state, owners)
        yield from _replica_families(state.replicas)
        if self.dcgm:
            yield from _dcgm_families(state, owners)
        age = GaugeMetricFamily(
            "kvpilot_agent_state_timestamp_seconds", "When the last NodeState was assembled."
        )
        age.add_metric([], state.observed_at)
        yield age


def _gpu_families(state: NodeState, owners: dict[str, Owner]) -> Iterable[Metric]:
    for name, doc, fn in _GPU_FAMILIES:
        fam = GaugeMetricFamily(name, doc, labels=_GPU_LABELS)
        for g in state.gpus:
            v = fn(g)  # type: ignore[operator]
            if v is None:
                continue
            o = owners.get(g.uuid)
            fam.add_metric(
                [
                    str(g.index),
                    g.uuid,
                    g.name,
                    g.mig_instance or "",
                    state.node,
                    o.namespace if o else "",
                    o.pod if o else "",
                ],  # fmt: skip
                float(v),
            )
        yield fam


def _replica_families(replicas: Iterable[ReplicaState]) -> Iterable[Metric]:
    replicas = list(replicas)
    for name, doc, fn in _REPLICA_FAMILIES:
        fam = GaugeMetricFamily(name, doc, labels=_REPLICA_LABELS)
        for r in replicas:
            v = fn(r)  # type: ignore[operator]
            if v is not None:
                fam.add_metric(_replica_labels(r), float(v))
        yield fam
    pre = CounterMetricFamily(
        "kvpilot_replica_preemptions", "Preemptions the engine reported.", labels=_REPLICA_LABELS
    )
    for r in replicas:
        pre.add_metric(_replica_labels(r), float(r.preemptions_total))
    yield pre


def _replica_labels(r: ReplicaState) -> list[str]:
    return [r.replica_id, r.pool, r.engine, r.node, r.accelerator, r.role]


def _dcgm_families(state: NodeState, owners: dict[str, Owner]) -> Iterable[Metric]:
    for name, doc, fn in _DCGM:
        fam = GaugeMetricFamily(name, doc, labels=_DCGM_LABELS + ["GPU_I_ID"])
        for g in state.gpus:
            if not g.healthy:
                continue
            v = fn(g)  # type: ignore[operator]
            if v is None:
                continue
            fam.add_metric(_dcgm_labels(g, state.node, owners.get(g.uuid)), float(v))
        yield fam


def _dcgm_labels(g: GpuStats, node: str, o: Owner | None) -> list[str]:
    return [
        str(g.index), g.uuid, f"nvidia{g.index}", g.name, node,
        o.namespace if o else "", o.pod if o else "", o.container if o else "",
        g.mig_instance or "",
    ]  # fmt: skip
