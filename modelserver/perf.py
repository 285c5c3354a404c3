"""The roofline GPU performance model: the one place step times come from.

One engine iteration (a "step") runs every scheduled token through the model once: the linear
layers (QKV, O, MLP, lm_head) as GEMMs over all tokens of the step, and attention per sequence
over its context. Each is a roofline of its own:

- linear layers: ``max(FLOPs / (peak x mfu), weight bytes / (HBM x hbm_efficiency))``. A decode
  step of a few sequences reads every weight once for a handful of tokens (memory bound); a
  prefill chunk of thousands of tokens is compute bound. ``2 x params x tokens`` FLOPs.
- attention: ``max(4 x layers x q_heads x head_dim x (query, key) pairs / (peak x mfu),
  KV bytes read / (HBM x hbm_efficiency))``. Decode attention reads each sequence's whole KV
  cache for one query token: memory bound.

The two are *summed*, not maxed: in each layer the GEMMs and the attention kernel run one after
the other, so decode attention's KV traffic cannot hide under the prefill GEMMs of a mixed batch
(a single max over the whole step would let it and under-price long-context decode). Each one's
own compute and memory traffic do overlap (a kernel streams while it computes), hence the max
inside. A fixed ``step_overhead_s`` adds what does not scale with the batch: the scheduler,
input preparation, sampling, and kernel-launch gaps (vLLM V1 with CUDA graphs).

Tensor parallel over ``num_gpus`` splits weights, heads and KV evenly (Megatron-style), so FLOPs
and bytes divide over the GPUs, and adds two all-reduces per layer of the step's activations
(``tokens x hidden x 2`` bytes, ring: ``2 (n-1)/n`` of it over each GPU's link) plus a fixed
latency per all-reduce.

Calibration (the defaults of ``mfu``, ``hbm_efficiency`` and ``step_overhead_s``) and the public
figures they come from are described next to the defaults below; ``bench/fidelity.py`` checks the
model against public vLLM measurements it was *not* calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelserver.profiles import GiB, GpuProfile, ModelProfile, check_dtype

# ----------------------------------------------------------------------------- calibration
# DEFAULT_HBM_EFFICIENCY: share of datasheet HBM bandwidth that vLLM's decode reaches.
#   Calibrated on one public point: Llama-3.1-8B-Instruct bf16 on one A100 40GB, vLLM 0.23.0,
#   1024 in / 128 out, concurrency 1: "decode ... about 75 tokens/sec, roughly 77 % of the GPU's
#   memory-bandwidth ceiling" (J. Musgrave, "vLLM throughput-latency sweep on NVIDIA A100",
#   https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on). 75 tok/s is 13.3 ms per token;
#   16.06 GB of weights + ~1.1k tokens of KV over 1.555 TB/s is 10.4 ms at 100 %, so the step
#   is 10.4 / eff + overhead: eff 0.85 with the 1.1 ms overhead below gives 13.3 ms.
DEFAULT_HBM_EFFICIENCY = 0.85
# DEFAULT_STEP_OVERHEAD_S: per-step cost independent of the batch (scheduling, input prep,
#   sampling, launch gaps between CUDA graphs). One calibration point cannot separate it from the
#   HBM efficiency: 1.1 ms is our chosen split (~10 % of the A100 step), not a measurement. The
#   fidelity benchmark then checks both on other GPUs and vLLM versions without refitting:
#   H100 batch-1 TPOT 6.75 ms modelled vs 6.48 ms public (docs/benchmarks.md).
DEFAULT_STEP_OVERHEAD_S = 0.0011
# DEFAULT_MFU: model FLOP utilisation that prefill GEMMs and attention reach. Hopper/Ampere
#   GEMMs of vLLM-sized shapes (M = 2k-8k tokens, N/K = 4k-14k) run at 60-75 % of dense peak in
#   cuBLAS; with norms, activations, RoPE and attention in between, whole-model prefill lands
#   near 50 %. 0.5 is a prior, not fitted; no public TTFT point with a stated prompt length was
#   at hand to validate it (see docs/benchmarks.md).
DEFAULT_MFU = 0.5
# Memory vLLM keeps per GPU besides weights and KV: the activation peak it profiles with a
# dummy batch of max_num_batched_tokens, CUDA graphs, NCCL buffers, the CUDA context.
DEFAULT_ACTIVATION_OVERHEAD_BYTES = int(2.0 * GiB)
# Fixed cost of one all-reduce of a small message: an estimate of the order of NCCL's small-message
# latency inside one NVLink node (single-digit microseconds), not a measured figure; over PCIe we
# assume twice that. Untested by the fidelity benchmark (no tensor-parallel point yet).
NVLINK_ALLREDUCE_LATENCY_S = 8e-6
PCIE_ALLREDUCE_LATENCY_S = 16e-6


@dataclass(frozen=True)
class PerfModel:
    model: ModelProfile
    gpu: GpuProfile
    num_gpus: int = 1  # tensor parallel
    dtype: str = "bf16"  # weight format, a key of WEIGHT_FORMATS
    mfu: float = DEFAULT_MFU
    hbm_efficiency: float = DEFAULT_HBM_EFFICIENCY
    step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S
    kv_dtype_bytes: float = 2  # KV cache dtype: bf16 ("auto"); 1 for fp8 KV
    activation_overhead_bytes: int = DEFAULT_ACTIVATION_OVERHEAD_BYTES  # per GPU

    # Precomputed constants for step_time (it runs once per engine step).
    _lin_flops_per_token: float = field(init=False, repr=False, compare=False)
    _lm_head_flops: float = field(init=False, repr=False, compare=False)
    _attn_flops_per_pair: float = field(init=False, repr=False, compare=False)
    _flops_rate: float = field(init=False, repr=False, compare=False)
    _attn_flops_rate: float = field(init=False, repr=False, compare=False)
    _bytes_rate: float = field(init=False, repr=False, compare=False)
    _kv_per_token: float = field(init=False, repr=False, compare=False)
    _weight_time: float = field(init=False, repr=False, compare=False)
    _ar_bytes_per_token: float = field(init=False, repr=False, compare=False)
    _ar_latency: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if not isinstance(self.num_gpus, int) or self.num_gpus < 1:
            raise ValueError(f"num_gpus must be a positive integer, got {self.num_gpus!r}")
        for name in ("mfu", "hbm_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.step_overhead_s < 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {self.step_overhead_s!r}")
        m, n = self.model, self.num_gpus
        if m.attention_heads % n or m.kv_heads % n and n % m.kv_heads:
            raise ValueError(
                f"{m.name} has {m.attention_heads} attention and {m.kv_heads} KV heads: "
                f"tensor parallel over {n} GPUs must divide them"
            )
        put = object.__setattr__
        # Embedding lookups cost no FLOPs; the lm_head runs only for tokens that are sampled.
        put(self, "_lin_flops_per_token", 2.0 * (m.params - m.embedding_params))
        put(self, "_lm_head_flops", 2.0 * m.lm_head_params)
        put(self, "_attn_flops_per_pair", 4.0 * m.layers * m.attention_heads * m.head_dim)
        peak = self.gpu.peak_flops(self.dtype) * n
        put(self, "_flops_rate", peak * self.mfu)
        # Attention runs in bf16 (FlashAttention / FlashInfer) whatever the weight format.
        put(self, "_attn_flops_rate", self.gpu.peak_flops("bf16") * n * self.mfu)
        put(self, "_bytes_rate", self.gpu.hbm_bandwidth_bytes_s * n * self.hbm_efficiency)
        put(self, "_kv_per_token", m.kv_bytes_per_token(self.kv_dtype_bytes))
        put(self, "_weight_time", self.weight_bytes / self._bytes_rate)
        if n > 1:
            # Two all-reduces per layer (after attention's O and the MLP's down projection).
            ring = 2.0 * (n - 1) / n
            put(self, "_ar_bytes_per_token", 2 * m.layers * m.hidden_size * 2 * ring)
            lat = (
                NVLINK_ALLREDUCE_LATENCY_S
                if self.gpu.interconnect_bytes_s >= 100e9
                else (PCIE_ALLREDUCE_LATENCY_S)
            )
            put(self, "_ar_latency", 2 * m.layers * lat)
        else:
            put(self, "_ar_bytes_per_token", 0.0)
            put(self, "_ar_latency", 0.0)

    # ------------------------------------------------------------------------- memory
    @property
    def weight_bytes(self) -> int:
        """Weights of the whole model, all GPUs together."""
        return self.model.weight_bytes(self.dtype)

    def kv_bytes_per_token(self) -> float:
        """K and V of one token over all layers, all GPUs together."""
        return self._kv_per_token

    def kv_bytes_per_block(self, block_size: int = 16) -> int:
        return int(self._kv_per_token * block_size)

    def kv_cache_bytes(self, gpu_memory_utilization: float = 0.9) -> int:
        """What vLLM would give the KV cache: memory x utilisation - weights - activations and
        overhead, per GPU, times the GPUs; never below zero (``validate`` reports that case)."""
        per_gpu = (
            self.gpu.memory_bytes * gpu_memory_utilization
            - self.weight_bytes / self.num_gpus
            - self.activation_overhead_bytes
        )
        return max(0, int(per_gpu)) * self.num_gpus

    def validate(self, gpu_memory_utilization: float = 0.9) -> None:
        """ValueError when the weights do not leave room for a KV cache on these GPUs."""
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}"
            )
        if self.kv_cache_bytes(gpu_memory_utilization) <= 0:
            budget = self.gpu.memory_bytes * gpu_memory_utilization
            raise ValueError(
                f"{self.model.name} in {self.dtype} needs {self.weight_bytes / 1e9:.1f} GB of "
                f"weights ({self.weight_bytes / self.num_gpus / 1e9:.1f} GB per GPU) plus "
                f"{self.activation_overhead_bytes / 1e9:.1f} GB of activations; "
                f"{self.num_gpus} x {self.gpu.alias} at gpu_memory_utilization "
                f"{gpu_memory_utilization} offer {budget / 1e9:.1f} GB per GPU: no room for a KV "
                "cache (use more GPUs, a larger GPU or a smaller weight format)"
            )

    def hbm_used_bytes(self, kv_blocks_used: int, block_size: int = 16) -> int:
        """Device memory in use on *each* GPU: weights, activations, allocated KV blocks."""
        kv = kv_blocks_used * self.kv_bytes_per_block(block_size)
        return int((self.weight_bytes + kv) / self.num_gpus + self.activation_overhead_bytes)

    # ------------------------------------------------------------------------- time
    def _parts(
        self,
        prefill_tokens: int,
        prefill_attended_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
    ) -> tuple[float, float, float, float, float]:
        """(linear compute s, linear memory s, attention compute s, attention memory s, comm s)
        at the achieved rates."""
        tokens = prefill_tokens + decode_seqs
        sampled = decode_seqs + (1 if prefill_tokens else 0)
        lin_c = (self._lin_flops_per_token * tokens + self._lm_head_flops * sampled) / (
            self._flops_rate
        )
        lin_m = self._weight_time
        pairs = prefill_attended_tokens + decode_context_tokens
        att_c = self._attn_flops_per_pair * pairs / self._attn_flops_rate
        # Decode reads every context token's K and V; prefill writes its new tokens' K and V
        # (its reads of the prefix are served from on-chip tiles, charged under compute).
        att_m = self._kv_per_token * (decode_context_tokens + prefill_tokens) / self._bytes_rate
        comm = 0.0
        if self.num_gpus > 1 and tokens:
            comm = self._ar_latency + self._ar_bytes_per_token * tokens / (
                self.gpu.interconnect_bytes_s
            )
        return lin_c, lin_m, att_c, att_m, comm

    def step_time(
        self,
        prefill_tokens: int,
        prefill_attended_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
    ) -> float:
        """Seconds of one engine iteration: ``prefill_tokens`` new prompt tokens attending to
        ``prefill_attended_tokens`` (query, key) pairs in total, plus ``decode_seqs`` sequences
        decoding one token each over contexts totalling ``decode_context_tokens``."""
        if prefill_tokens <= 0 and decode_seqs <= 0:
            return 0.0
        lin_c, lin_m, att_c, att_m, comm = self._parts(
            prefill_tokens, prefill_attended_tokens, decode_seqs, decode_context_tokens
        )
        lin = lin_c if lin_c > lin_m else lin_m
        att = att_c if att_c > att_m else att_m
        return lin + att + comm + self.step_overhead_s

    def utilisation(
        self,
        prefill_tokens: int,
        prefill_attended_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
    ) -> tuple[float, float]:
        """(compute activity, memory-bandwidth activity), each 0-1, of that step: the share of
        dense peak FLOP/s and of peak HBM bandwidth the step achieves on average — what DCGM's
        tensor-pipe-active and DRAM-active report (NVML's duty cycle is ~1 whenever a step runs)."""
        duration = self.step_time(
            prefill_tokens, prefill_attended_tokens, decode_seqs, decode_context_tokens
        )
        if duration <= 0:
            return 0.0, 0.0
        lin_c, lin_m, att_c, att_m, _ = self._parts(
            prefill_tokens, prefill_attended_tokens, decode_seqs, decode_context_tokens
        )
        # The parts are times at achieved rates; times at peak are mfu / efficiency of them.
        compute = (lin_c + att_c) * self.mfu / duration
        memory = (lin_m + att_m) * self.hbm_efficiency / duration
        return min(1.0, compute), min(1.0, memory)
