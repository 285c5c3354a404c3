"""Load 1.0: the fleet's saturation request rate for a workload, measured once, the same for all.

Each replica kind (GPU, GPUs per replica, model, engine limits) runs its own closed loop on the
real engine: the waiting queue is kept non-empty with requests drawn from the workload's sizes,
so the replica is always as full as its scheduler allows, and the completion rate after a warm-up
is its saturation rate. The fleet's is the sum over its replicas. No router is involved, so the
number is the same for every policy; results are cached on disk (keyed by everything that changes
them) because the comparisons ask for them again and again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sim.fleets import FleetSpec, ReplicaSpec
from sim.tokens import BLOCK_TOKENS, prompt_token_ids
from sim.traces import make_trace

CALIBRATION_SEED = 1_000_003  # not a run seed: calibration sizes are their own sample
_VERSION = "2"
_memo: dict[str, float] = {}


def cache_path() -> Path:
    env = os.environ.get("KVPILOT_SIM_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "kvpilot" / "sim-calibration.json"


def _key(
    spec: ReplicaSpec, workload: str, trace_file: str | None, gpu_mem_util: float, completions: int
) -> str:
    tf = ""
    if trace_file:
        tf = hashlib.sha256(Path(trace_file).read_bytes()).hexdigest()[:16]
    return f"v{_VERSION}|{workload}|{tf}|{spec.kind}|{gpu_mem_util}|{completions}"


def replica_saturation_rate(
    spec: ReplicaSpec,
    workload: str,
    *,
    trace_file: str | None = None,
    gpu_memory_utilization: float = 0.9,
    completions: int = 400,
    warmup: int = 100,
) -> float:
    """Requests per second one replica of `spec` completes when kept full of `workload`."""
    from modelserver.profiles import resolve_gpu, resolve_model
    from modelserver.scheduler import Engine, EngineConfig

    engine = Engine(
        EngineConfig(
            model=resolve_model(spec.model),
            gpu=resolve_gpu(spec.gpu),
            num_gpus=spec.num_gpus,
            max_num_seqs=spec.max_num_seqs,
            max_num_batched_tokens=spec.max_num_batched_tokens,
            block_size=BLOCK_TOKENS,
            gpu_memory_utilization=gpu_memory_utilization,
        )
    )
    need = completions + warmup + spec.max_num_seqs + 64
    duration = 600.0
    reqs = []
    while len(reqs) < need:
        reqs = make_trace(workload, 10.0, duration, CALIBRATION_SEED, trace_file=trace_file)
        duration *= 2
    it = iter(reqs)
    depth = spec.max_num_seqs + 16  # running + waiting: the waiting queue never runs dry
    outstanding = 0

    def feed() -> None:
        nonlocal outstanding
        while outstanding < depth:
            r = next(it)
            ids = prompt_token_ids(r)
            try:
                engine.add_request(r.request_id, ids, r.output_tokens, ignore_eos=True)
            except ValueError:
                continue  # too long for this replica: not part of what it can serve
            outstanding += 1

    now = 0.0
    done = 0
    t_start = None
    feed()
    while done < warmup + completions:
        out = engine.step(now)
        if out.duration_s <= 0:
            raise RuntimeError(f"calibration stalled on {spec.kind} with {workload}")
        now += out.duration_s
        for o in out.outputs:
            if o.finish_reason is not None:
                done += 1
                outstanding -= 1
                if done == warmup:
                    t_start = now
        feed()
    assert t_start is not None
    return completions / (now - t_start)


def fleet_saturation_rate(
    fleet: FleetSpec,
    workload: str,
    *,
    trace_file: str | None = None,
    gpu_memory_utilization: float = 0.9,
    completions: int = 400,
    use_cache: bool = True,
    dry: bool = False,
) -> float:
    """Load 1.0 in requests per second: the sum of each replica's saturation rate.

    With `dry`, only what is cached (in memory or on disk) is used: LookupError if a rate would
    have to be measured (callers that calibrate many kinds in parallel ask first)."""
    total = 0.0
    for spec in fleet.replicas:
        total += _cached_rate(
            spec, workload, trace_file, gpu_memory_utilization, completions, use_cache, dry
        )
    return total


def store_rate(
    spec: ReplicaSpec,
    workload: str,
    rate: float,
    *,
    trace_file: str | None = None,
    gpu_memory_utilization: float = 0.9,
    completions: int = 400,
) -> None:
    """Record a rate measured elsewhere (e.g. in a worker process) as if measured here:
    `replica_saturation_rate(spec, workload, completions=completions, warmup=completions // 4)`."""
    key = _key(spec, workload, trace_file, gpu_memory_utilization, completions)
    _memo[key] = rate
    _write(key, rate)


def _write(key: str, rate: float) -> None:
    path = cache_path()
    try:
        disk: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        disk = {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        disk[key] = rate
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(disk, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home is no reason to fail a run


def _cached_rate(
    spec: ReplicaSpec,
    workload: str,
    trace_file: str | None,
    util: float,
    completions: int,
    use_cache: bool,
    dry: bool = False,
) -> float:
    key = _key(spec, workload, trace_file, util, completions)
    if key in _memo:
        return _memo[key]
    path = cache_path()
    disk: dict[str, float] = {}
    if use_cache and path.exists():
        try:
            disk = json.loads(path.read_text())
        except (OSError, ValueError):
            disk = {}
    if use_cache and key in disk:
        _memo[key] = float(disk[key])
        return _memo[key]
    if dry:
        raise LookupError(key)
    rate = replica_saturation_rate(
        spec,
        workload,
        trace_file=trace_file,
        gpu_memory_utilization=util,
        completions=completions,
        warmup=max(20, completions // 4),
    )
    _memo[key] = rate
    if use_cache:
        _write(key, rate)
    return rate
