"""The model server's Prometheus metrics, under vLLM's own names, labels and bucket boundaries.

Everything that reads vLLM (the agent's adapter, the Inference Gateway's picker, dashboards) can read
an emulated server unchanged. Counters are declared without `_total` (as vLLM's v1 engine does) and
prometheus-client exposes them as `vllm:prompt_tokens_total` and so on. Each server instance owns its
own `CollectorRegistry`, so several servers can live in one test process.

Timings are in the engine's modelled seconds (what the emulated GPU would take), not in scaled wall
time: a server run with `--time-scale 20` reports the latencies the real GPU would show.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# vllm/v1/metrics/loggers.py (PrometheusStatLogger)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TOKEN_COUNT_BUCKETS = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10000,
    20000,
    50000,
    100000,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """One server's metrics, all carrying `model_name`, with the label children bound once."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels, m = self.registry, ["model_name"], model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(m)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(m)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(m)

        self.num_requests_running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_cache_usage_perc = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.num_preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemptions from the engine."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self._request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            TOKEN_COUNT_BUCKETS,
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            TOKEN_COUNT_BUCKETS,
        )
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._cache_config = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            ["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching",
             "gpu_memory_utilization", "cache_dtype"],
            registry=r,
        )  # fmt: skip

        # The emulator's own figures, under kvpilot's prefix: what the overhead benchmark reads.
        self.engine_steps = counter("kvpilot_modelserver_engine_steps", "Engine steps run.")
        self.engine_step_cpu = counter(
            "kvpilot_modelserver_engine_step_cpu_seconds",
            "CPU time spent inside Engine.step (the scheduler's own cost).",
        )
        self.engine_step_modelled = counter(
            "kvpilot_modelserver_engine_step_modelled_seconds",
            "GPU time the steps modelled (sum of step durations).",
        )
        self.engine_lag = gauge(
            "kvpilot_modelserver_engine_lag_seconds",
            "How far the engine clock ran behind scaled wall time at the last step (0 = real time).",
        )
        self.engine_resyncs = counter(
            "kvpilot_modelserver_engine_resyncs",
            "Times the engine fell too far behind scaled wall time and dropped the backlog.",
        )

    def set_cache_config(
        self,
        model_name: str,
        block_size: int,
        num_gpu_blocks: int,
        enable_prefix_caching: bool,
        gpu_memory_utilization: float,
    ) -> None:
        self._cache_config.labels(
            model_name=model_name,
            block_size=str(block_size),
            num_gpu_blocks=str(num_gpu_blocks),
            enable_prefix_caching=str(enable_prefix_caching),
            gpu_memory_utilization=str(gpu_memory_utilization),
            cache_dtype="auto",
        ).set(1)

    def request_success(self, model_name: str, finished_reason: str) -> None:
        self._request_success.labels(model_name, finished_reason).inc()

    def bind_state(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_usage: Callable[[], float],
    ) -> None:
        """The gauges read the engine at scrape time, so an abort shows at once."""
        self.num_requests_running.set_function(running)
        self.num_requests_waiting.set_function(waiting)
        self.kv_cache_usage_perc.set_function(kv_usage)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
