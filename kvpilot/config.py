"""kvpilot.yaml: typed, validated settings, and a watcher that hands out each new valid version.

Every section is a frozen dataclass; `load_config` builds them from the YAML by walking their type
hints, so adding a key is adding a field. Any mistake raises `ConfigError` naming the key path,
the value and what was expected, e.g. ``gateway.policy: 'fastest' is not one of ['headroom', ...]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from prometheus_client import Counter

log = logging.getLogger(__name__)

CONFIG_RELOADS = Counter(
    "kvpilot_config_reloads_total",
    "Config file reloads by result (applied or rejected).",
    ["result"],
)


class ConfigError(ValueError):
    """A bad configuration: the message names the key, the value and what was expected."""


@dataclass(frozen=True)
class PoolConfig:
    """A set of interchangeable model-server replicas (one Deployment in Kubernetes)."""

    name: str
    models: tuple[str, ...]
    endpoints: tuple[str, ...] = ()  # static replicas outside Kubernetes
    namespace: str = "default"
    selector: dict[str, str] = field(default_factory=dict)  # pod labels in Kubernetes
    engine: Literal["auto", "vllm", "sglang", "tgi", "trtllm", "kvpilot"] = "auto"
    accelerator: str = ""  # GKE accelerator label or alias, e.g. nvidia-l4
    gpus_per_replica: int = 1
    port: int = 8000  # model-server port on each pod
    policy: str = ""  # overrides gateway.policy for this pool when set


@dataclass(frozen=True)
class AgentConfig:
    listen: str = "127.0.0.1:9100"
    gpus: Literal["nvml", "emulated"] = "nvml"
    scrape_interval_s: float = 0.25
    scrape_timeout_s: float = 1.0
    stale_after_s: float = 5.0
    dcgm_compatible_metrics: bool = False
    node_name: str = ""  # defaults to $NODE_NAME, then the host name
    kubernetes: bool = False  # watch Pods on this node instead of pools[].endpoints
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    gpu_map: dict[str, tuple[int, ...]] = field(default_factory=dict)  # endpoint -> GPU indices
    rate_window_s: float = 5.0  # token rates and TTFT/TPOT means over this recent window
    accelerator: str = ""  # GKE accelerator label of this node, when pods and pools do not say
    pod_resources_refresh_s: float = 5.0  # how often to ask the kubelet who holds which GPU
    # GPUs are read at most this often (model servers every scrape_interval_s): one NVML read of
    # an H200 took 4.4 ms, so 8 GPUs at 4 Hz would cost ~14 % of a core for slow-moving numbers.
    gpu_interval_s: float = 1.0


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = "127.0.0.1:8080"
    agents: tuple[str, ...] = ()
    policy: str = "headroom"
    kubernetes: bool = False  # discover replicas from EndpointSlices
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 8 * 1024 * 1024
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 120.0
    idle_timeout_s: float = 60.0
    max_retries: int = 2
    queue_size: int = 1024
    queue_timeout_s: float = 30.0
    services: dict[str, str] = field(default_factory=dict)  # pool -> Service (default: its name)
    model_priority: dict[str, int] = field(default_factory=dict)  # default x-kvpilot-priority
    scrape_fallback: bool = True  # scrape /metrics of replicas no agent reports
    scrape_interval_s: float = 0.5
    stale_after_s: float = 5.0  # older states are ignored: route on in-flight counts
    eject_after_failures: int = 3  # consecutive failures before the first byte
    eject_for_s: float = 10.0
    retry_budget_ratio: float = 0.2  # retries may add this share of the request rate
    retry_budget_min_per_s: float = 5.0  # ... plus this many per second
    queue_when_saturated: bool = (
        True  # headroom holds requests when no replica fits (else fail open)
    )
    # processes sharing the listen port (SO_REUSEPORT), each with its own account; 0: one per CPU
    # the pod may use (its CPU limit, else its affinity; kvpilot/cpus.py)
    workers: int = 1
    # how often workers exchange their in-flight totals (gateway/peers.py); 0: never
    peer_sync_s: float = 0.01
    # The SLO headroom routes and releases held requests by (gateway/headroom.py's defaults):
    # TTFT target = ttft_target_s + ttft_per_1k_tokens_s x prompt tokens / 1000.
    ttft_target_s: float = 1.0
    ttft_per_1k_tokens_s: float = 0.2
    tpot_target_s: float = 0.1
    # On SIGTERM requests in progress get this long to finish; streams still running then end
    # with an SSE error event. The pod's terminationGracePeriodSeconds (60) counts from the
    # preStop hook (a 5 s sleep) and must also hold this, up to 5 s to end what still runs and
    # aiohttp's last writes (2 x 2 s): 5 + 45 + 5 + 4 = 59.
    shutdown_timeout_s: float = 45.0


@dataclass(frozen=True)
class PoolScalingConfig:
    """How the controller scales one pool (`controller.pools.<pool name>`); see docs/controller.md."""

    min_replicas: int = 1
    max_replicas: int = 8
    queue_target: float = 4.0  # waiting requests per replica
    kv_target: float = 0.8  # KV-cache usage per replica
    batch_target: float = 48.0  # running requests per replica
    tolerance: float = 0.1
    target_utilization: float = 0.65  # saturation to hold: the rest is headroom for bursts
    # ... once the daily profile forecasts: it orders the ramps ahead, so the headroom is for
    # bursts alone (before, on the trend, it must also carry a ramp the trend has yet to see).
    profile_utilization: float = 0.7
    # ... and at the profile's daily peak (from its daily mean up, it goes linearly from the one
    # to this): the SLO is a share of the day's requests, and a burst at the peak puts the most
    # of them at risk, on a pool sized most tightly (no ramp ordered ahead there).
    peak_utilization: float = 0.6
    scale_up_margin: float = 0.1  # a scale-up goes this much past the need, on the trend alone
    # Scale down only below (1 - this) x current replicas: fewer, larger steps down. Off by
    # default: each replica given back as the window's maximum decays frees its node the sooner
    # (0.2 held ~0.15 GPU-h a simulated day, for 13 actions a day against 19; the baselines
    # take 75).
    scale_down_tolerance: float = 0.0
    scale_up_percent: float = 100.0  # per scale_up_period_s ...
    scale_up_pods: int = 4  # ... or this many pods, whichever is larger
    scale_up_period_s: float = 15.0
    scale_down_stabilization_s: float = 300.0
    panic_threshold: float = 2.0  # mean saturation that counts as sudden overload
    panic_hold_s: float = 60.0
    scale_to_zero: bool = False
    idle_before_zero_s: float = 600.0
    stale_after_s: float = 30.0  # older replica states count as missing metrics
    forecast: bool = True
    lead_time_s: float = 720.0  # node provisioning + replica start-up the forecast looks ahead
    # A rise above what the daily profile expects gets no new GPU nodes until it has lasted this
    # long (only warm capacity: placeholders already on nodes); 0 = scale up at once, as the HPA.
    spike_hold_s: float = 720.0
    demand_window_s: float = 60.0  # time constant of the pool's smoothed tokens/s and saturation
    trend_alpha: float = 0.3  # Holt level smoothing, per decision
    trend_beta: float = 0.1  # Holt trend smoothing, per decision
    trend_damping_s: float = 1800.0  # the trend fades with this time constant over the lead time
    season_s: float = 86400.0  # the demand's period (a day); 0 = trend only (controller/season.py)
    capacity_tokens_per_s: float = 0.0  # one replica at saturation 1; 0 = learn it
    capacity_min_saturation: float = 0.5  # learn capacity only from replicas at least this busy
    # ... and no busier than this: past saturation 1 the queue term grows with the backlog while
    # tokens/s stays at the replicas' limit, so tokens per unit of saturation reads low.
    capacity_max_saturation: float = 1.0
    capacity_learn_rate: float = 0.05  # per decision
    kind: Literal["Deployment", "StatefulSet", "LeaderWorkerSet"] = "Deployment"
    target: str = ""  # workload name; defaults to the pool name
    accelerators: tuple[str, ...] = ()  # accelerator pools this pool may grow into (planner picks)
    headroom_gpus: int = 0  # spare GPUs kept warm per accelerator
    node_pool: str = ""  # GKE node pool for the gke node actuator


@dataclass(frozen=True)
class ControllerConfig:
    mode: Literal["kubernetes", "local"] = "kubernetes"
    interval_s: float = 15.0
    dry_run: bool = False
    agents: tuple[str, ...] = ()  # agent URLs; defaults to gateway.agents
    # Gateway URLs (a headless Service name finds every gateway pod) whose /metrics say how many
    # requests wait for each pool: the only demand signal of a pool scaled to zero.
    gateways: tuple[str, ...] = ()
    listen: str = "127.0.0.1:9300"  # /metrics and /healthz
    pools: dict[str, PoolScalingConfig] = field(default_factory=dict)
    node_actuator: Literal["none", "placeholders", "gke"] = "none"
    placeholder_namespace: str = "kvpilot-placeholders"
    placeholder_priority_class: str = "kvpilot-placeholder"
    placeholder_image: str = "registry.k8s.io/pause:3.10"
    leader_election: bool = True
    lease_name: str = "kvpilot-controller"
    lease_namespace: str = "kvpilot"
    lease_duration_s: float = 15.0
    # ConfigMap (in lease_namespace) where the leader saves each pool's daily profile, so the
    # next leader goes on from it; "" keeps it in memory only (a new leader learns a day again).
    state_configmap: str = "kvpilot-controller-state"
    gke_project: str = ""
    gke_location: str = ""
    gke_cluster: str = ""
    gke_api_url: str = "https://container.googleapis.com"
    gke_metadata_url: str = "http://metadata.google.internal"
    local_gpu: str = "l4"  # GPU profile for modelservers started in local mode
    local_time_scale: float = 1.0


@dataclass(frozen=True)
class Config:
    pools: tuple[PoolConfig, ...] = ()
    agent: AgentConfig = field(default_factory=AgentConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)

    def pool(self, name: str) -> PoolConfig | None:
        return next((p for p in self.pools if p.name == name), None)

    def pool_for_model(self, model: str) -> PoolConfig | None:
        return next((p for p in self.pools if model in p.models), None)


T = TypeVar("T")


def parse_config(data: Any) -> Config:
    """Build and validate a Config from already-parsed YAML data."""
    if data is None:
        data = {}
    cfg = _build(Config, data, "")
    _check(cfg)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate kvpilot.yaml; raises ConfigError with the key path on any mistake."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e


def load_or_exit(path: str | os.PathLike[str]) -> Config:
    """For command-line entry points: a bad config prints one clear line and exits 2."""
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"kvpilot: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "0.0.0.0", int(port)


async def watch_config(
    path: str | os.PathLike[str],
    current: Config,
    *,
    interval_s: float = 1.0,
    on_error: Callable[[ConfigError], None] | None = None,
) -> AsyncIterator[Config]:
    """Yield each new valid version of the file; a bad version is logged, counted and skipped.

    Polls the file's mtime and contents (ConfigMap updates swap a symlink, which inotify on the
    file itself misses), so it works the same on a laptop and in a pod.
    """
    p = Path(path)
    last_text = _read_or_none(p)
    while True:
        await asyncio.sleep(interval_s)
        text = _read_or_none(p)
        if text is None or text == last_text:
            continue
        last_text = text
        try:
            new = load_config(p)
        except ConfigError as e:
            CONFIG_RELOADS.labels("rejected").inc()
            log.error("config reload rejected, keeping the old one: %s", e)
            if on_error:
                on_error(e)
            continue
        if new != current:
            CONFIG_RELOADS.labels("applied").inc()
            log.info("config reloaded from %s", p)
            current = new
            yield new


def _read_or_none(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


def _check(cfg: Config) -> None:
    """Cross-field rules that types alone cannot say."""
    from gateway.picker import POLICY_NAMES  # the picker owns its policies' names

    seen: set[str] = set()
    for i, pool in enumerate(cfg.pools):
        if pool.name in seen:
            raise ConfigError(
                f"pools[{i}].name: {pool.name!r} is used by two pools; names must be unique"
            )
        seen.add(pool.name)
        if not pool.models:
            raise ConfigError(f"pools[{i}].models: empty; expected at least one model name")
        for j, ep in enumerate(pool.endpoints):
            if not ep.startswith(("http://", "https://")):
                raise ConfigError(
                    f"pools[{i}].endpoints[{j}]: {ep!r} is not a URL; expected http://host:port"
                )
        if pool.policy and pool.policy not in POLICY_NAMES:
            raise ConfigError(
                f"pools[{i}].policy: {pool.policy!r} is not one of {list(POLICY_NAMES)}"
            )
        if pool.gpus_per_replica < 1:
            raise ConfigError(f"pools[{i}].gpus_per_replica: {pool.gpus_per_replica} must be >= 1")
    if cfg.gateway.policy not in POLICY_NAMES:
        raise ConfigError(
            f"gateway.policy: {cfg.gateway.policy!r} is not one of {list(POLICY_NAMES)}"
        )
    for key, addr in (("agent.listen", cfg.agent.listen), ("gateway.listen", cfg.gateway.listen)):
        _check_listen(key, addr)
    _check_controller(cfg)
    gw = cfg.gateway
    _check_gateway_refs(cfg)
    for key in (
        "connect_timeout_s",
        "first_byte_timeout_s",
        "idle_timeout_s",
        "queue_timeout_s",
        "scrape_interval_s",
        "stale_after_s",
        "eject_for_s",
    ):
        if getattr(gw, key) <= 0:
            raise ConfigError(f"gateway.{key}: {getattr(gw, key)} must be > 0 seconds")
    if not 0 <= gw.shutdown_timeout_s <= 3600:
        raise ConfigError(
            f"gateway.shutdown_timeout_s: {gw.shutdown_timeout_s} must be 0 to 3600 seconds"
        )
    for key in ("max_retries", "queue_size", "max_body_bytes", "eject_after_failures"):
        if getattr(gw, key) < (0 if key == "max_retries" else 1):
            raise ConfigError(f"gateway.{key}: {getattr(gw, key)} is out of range")
    if not 0 <= gw.retry_budget_ratio <= 1:
        raise ConfigError(f"gateway.retry_budget_ratio: {gw.retry_budget_ratio} must be 0 to 1")
    if not 0 <= gw.peer_sync_s <= 1:
        raise ConfigError(f"gateway.peer_sync_s: {gw.peer_sync_s} must be 0 (off) to 1 second")
    if not 0 <= gw.workers <= 64:
        raise ConfigError(f"gateway.workers: {gw.workers} must be 0 (one per CPU) to 64")
    for key in ("ttft_target_s", "tpot_target_s"):
        if not 0 < getattr(gw, key) <= 3600:
            raise ConfigError(f"gateway.{key}: {getattr(gw, key)} must be > 0 and <= 3600 seconds")
    if not 0 <= gw.ttft_per_1k_tokens_s <= 3600:
        raise ConfigError(
            f"gateway.ttft_per_1k_tokens_s: {gw.ttft_per_1k_tokens_s} must be 0 to 3600 seconds"
        )
    for key in (
        "scrape_timeout_s",
        "stale_after_s",
        "rate_window_s",
        "pod_resources_refresh_s",
        "gpu_interval_s",
    ):
        if getattr(cfg.agent, key) <= 0:
            raise ConfigError(f"agent.{key}: {getattr(cfg.agent, key)} must be > 0 seconds")
    if not 0.05 <= cfg.agent.scrape_interval_s <= 60:
        raise ConfigError(
            f"agent.scrape_interval_s: {cfg.agent.scrape_interval_s} is out of range; "
            "expected 0.05 to 60 seconds"
        )


def _check_gateway_refs(cfg: Config) -> None:
    """Gateway keys that name URLs, pools and models: each must be one."""
    gw = cfg.gateway
    for j, key in enumerate(gw.api_keys):
        if not key.strip():
            raise ConfigError(f"gateway.api_keys[{j}]: empty; an API key must not be blank")
    for j, url in enumerate(gw.agents):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"gateway.agents[{j}]: {url!r} is not a URL; expected http://host:port"
            )
    for name in gw.services:
        if cfg.pool(name) is None:
            raise ConfigError(f"gateway.services.{name}: no pool named {name!r} in pools[]")
    for model in gw.model_priority:
        if cfg.pool_for_model(model) is None:
            raise ConfigError(f"gateway.model_priority.{model}: no pool serves model {model!r}")


def _check_controller(cfg: Config) -> None:
    c = cfg.controller
    _check_listen("controller.listen", c.listen)
    if c.interval_s <= 0:
        raise ConfigError(f"controller.interval_s: {c.interval_s} must be > 0 seconds")
    if c.lease_duration_s < 2:
        raise ConfigError(f"controller.lease_duration_s: {c.lease_duration_s} must be >= 2 seconds")
    for key, urls in (("controller.agents", c.agents), ("controller.gateways", c.gateways)):
        for j, url in enumerate(urls):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"{key}[{j}]: {url!r} is not a URL; expected http://host:port")
    if c.node_actuator == "gke" and not (c.gke_project and c.gke_location and c.gke_cluster):
        raise ConfigError(
            "controller.node_actuator: 'gke' needs controller.gke_project, gke_location and gke_cluster"
        )
    for name, s in c.pools.items():
        key = f"controller.pools.{name}"
        if cfg.pool(name) is None:
            raise ConfigError(f"{key}: no pool named {name!r} in pools[]")
        check_scaling(s, key)


def parse_scaling(data: dict[str, Any], key: str) -> PoolScalingConfig:
    """One pool's scaling settings from plain data (e.g. `kvpilot sim autoscale --kvpilot k=v`),
    checked as in kvpilot.yaml; ConfigError names `key`.<the bad key>."""
    s = _build(PoolScalingConfig, data, key)
    check_scaling(s, key)
    return s


def check_scaling(s: PoolScalingConfig, key: str) -> None:
    """Rules on one pool's scaling settings that types alone cannot say."""
    if s.min_replicas < 0 or s.max_replicas < max(1, s.min_replicas):
        raise ConfigError(
            f"{key}: min_replicas {s.min_replicas} / max_replicas {s.max_replicas}; "
            "expected 0 <= min_replicas <= max_replicas and max_replicas >= 1"
        )
    if s.min_replicas == 0 and not s.scale_to_zero:
        raise ConfigError(f"{key}.min_replicas: 0 needs scale_to_zero: true")
    for k in ("queue_target", "kv_target", "batch_target", "scale_up_period_s"):
        if getattr(s, k) <= 0:
            raise ConfigError(f"{key}.{k}: {getattr(s, k)} must be > 0")
    if not 0 <= s.tolerance < 1:
        raise ConfigError(f"{key}.tolerance: {s.tolerance} must be in [0, 1)")
    if s.kv_target > 1:
        raise ConfigError(f"{key}.kv_target: {s.kv_target} must be <= 1")
    for k, lo, hi in (
        ("target_utilization", 0.0, 1.0),
        ("profile_utilization", 0.0, 1.0),
        ("peak_utilization", 0.0, 1.0),
        ("trend_alpha", 0.0, 1.0),
        ("capacity_learn_rate", 0.0, 1.0),
    ):
        if not lo < getattr(s, k) <= hi:
            raise ConfigError(f"{key}.{k}: {getattr(s, k)} must be in ({lo:g}, {hi:g}]")
    if not 0 <= s.capacity_min_saturation <= 1:
        raise ConfigError(
            f"{key}.capacity_min_saturation: {s.capacity_min_saturation} must be in [0, 1]"
        )
    if s.capacity_max_saturation <= s.capacity_min_saturation:
        raise ConfigError(
            f"{key}.capacity_max_saturation: {s.capacity_max_saturation} must be above "
            f"capacity_min_saturation ({s.capacity_min_saturation})"
        )
    if not 0 <= s.trend_beta <= 1 or not 0 <= s.scale_down_tolerance < 1:
        raise ConfigError(f"{key}: trend_beta must be in [0, 1] and scale_down_tolerance in [0, 1)")
    for k in ("demand_window_s", "trend_damping_s"):
        if getattr(s, k) <= 0:
            raise ConfigError(f"{key}.{k}: {getattr(s, k)} must be > 0 seconds")
    for k in (
        "scale_up_margin",
        "lead_time_s",
        "spike_hold_s",
        "capacity_tokens_per_s",
        "season_s",
    ):
        if getattr(s, k) < 0:
            raise ConfigError(f"{key}.{k}: {getattr(s, k)} must be >= 0")


def _check_listen(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {value!r} is not host:port; expected e.g. 127.0.0.1:8080")


def _build(tp: Any, value: Any, path: str) -> Any:
    """Convert parsed YAML `value` to type `tp`, or raise ConfigError naming `path`."""
    where = path or "<top level>"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            key = f"{path}.{unknown[0]}" if path else str(unknown[0])
            raise ConfigError(f"{key}: unknown key; expected one of {sorted(fields)}")
        kwargs = {}
        for name, f in fields.items():
            sub = f"{path}.{name}" if path else name
            if name in value:
                kwargs[name] = _build(hints[name], value[name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{sub}: required key is missing")
        return tp(**kwargs)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {_show(value)} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, path)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        return tuple(_build(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        return {
            _build(kt, k, f"{path}.{k}"): _build(vt, v, f"{path}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {_show(value)} is not a boolean; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {_show(value)} is not an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {_show(value)} is not a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {_show(value)} is not a string")
        return value
    raise TypeError(f"config type {tp!r} at {where} is not supported")  # a bug in a dataclass


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
