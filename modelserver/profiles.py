"""GPU, model and weight-format profiles: the public numbers the performance model stands on.

Every number carries its public source in a comment: a model's ``config.json`` on Hugging Face (and
the parameter count its model page shows from the safetensors index), a GPU's NVIDIA datasheet
(dense tensor-core rates: the datasheets quote "with sparsity" figures, twice the dense ones).
Nothing here computes a time; :mod:`modelserver.perf` does.

``resolve_gpu("h100")`` / ``resolve_gpu("nvidia-h100-80gb")`` and ``resolve_model("llama-3.1-8b")``
accept what users type; an unknown name raises ``ValueError`` listing the choices.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30
GB = 1e9

# ----------------------------------------------------------------------------- weight formats
# Bytes per parameter of the weights.
WEIGHT_FORMATS: dict[str, float] = {
    "fp32": 4,  # IEEE 754 single precision
    "bf16": 2,  # bfloat16: torch_dtype of every model below (config.json)
    "fp8": 1,  # FP8 E4M3 (vLLM --quantization fp8): per-tensor scales are negligible
    "int8": 1,  # INT8 W8A8 (SmoothQuant / compressed-tensors)
    "int4": 0.5,  # INT4 W4A16 (AWQ / GPTQ); group scales (fp16 per 128 weights) add ~3 %, left out
}

# Which tensor-core rate each format's matmuls run at. int4 is weight-only: it dequantises to bf16
# and multiplies there (AWQ/GPTQ Marlin kernels). fp32 runs as TF32, half the bf16 rate on every
# GPU here (A100: 156 vs 312; H100 SXM: 494.7 vs 989.4; L4: 60 vs 121 dense TFLOPS — datasheets).
COMPUTE_PATH: dict[str, str] = {
    "fp32": "tf32",
    "bf16": "bf16",
    "fp8": "fp8",
    "int8": "int8",
    "int4": "bf16",
}


def check_dtype(dtype: str) -> str:
    if dtype not in WEIGHT_FORMATS:
        raise ValueError(
            f"unknown weight format {dtype!r}; choose one of {', '.join(WEIGHT_FORMATS)}"
        )
    return dtype


# ----------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GpuProfile:
    """One GPU model as its datasheet describes it (SXM parts where there are several)."""

    alias: str  # "l4", "a100-40gb", "a100-80gb", "h100", "h200"
    label: str  # GKE accelerator label (cloud.google.com/gke-accelerator)
    product_name: str  # what NVML reports
    memory_bytes: int  # device memory as the driver reports it (nvidia-smi "Total")
    hbm_bandwidth_bytes_s: float  # peak device-memory bandwidth
    bf16_tflops: float  # dense
    fp8_tflops: float | None  # dense; None where the GPU has no fp8 tensor cores (A100)
    int8_tops: float  # dense
    tdp_w: float
    interconnect_bytes_s: float  # GPU-to-GPU, one direction: NVLink, or PCIe for L4

    def peak_flops(self, dtype: str) -> float:
        """Dense FLOP/s of the tensor-core path that weights in ``dtype`` run on."""
        path = COMPUTE_PATH[dtype]
        if path == "fp8" and self.fp8_tflops is not None:
            return self.fp8_tflops * 1e12
        if path == "int8":
            return self.int8_tops * 1e12
        if path == "tf32":
            return self.bf16_tflops * 0.5e12
        # bf16, and fp8 on Ampere: vLLM runs fp8 checkpoints weight-only there (fp8 Marlin).
        return self.bf16_tflops * 1e12


GPUS: dict[str, GpuProfile] = {
    g.alias: g
    for g in (
        # NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4/): 24 GB GDDR6 at 300 GB/s;
        # BF16 242 / FP8 485 / INT8 485 TFLOPS(TOPS) *with sparsity*; 72 W; PCIe Gen4 x16
        # (64 GB/s both ways), no NVLink. nvidia-smi reports 23034 MiB total.
        GpuProfile(
            alias="l4",
            label="nvidia-l4",
            product_name="NVIDIA L4",
            memory_bytes=23034 * MiB,
            hbm_bandwidth_bytes_s=300 * GB,
            bf16_tflops=121.0,
            fp8_tflops=242.5,
            int8_tops=242.5,
            tdp_w=72,
            interconnect_bytes_s=32 * GB,
        ),
        # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100/), SXM 40 GB: HBM2 1,555 GB/s;
        # BF16 312 TFLOPS dense (624 sparse); INT8 624 TOPS dense; no FP8; 400 W; NVLink
        # 600 GB/s (both ways). nvidia-smi reports 40960 MiB for A100-SXM4-40GB.
        GpuProfile(
            alias="a100-40gb",
            label="nvidia-tesla-a100",
            product_name="NVIDIA A100-SXM4-40GB",
            memory_bytes=40960 * MiB,
            hbm_bandwidth_bytes_s=1555 * GB,
            bf16_tflops=312.0,
            fp8_tflops=None,
            int8_tops=624.0,
            tdp_w=400,
            interconnect_bytes_s=300 * GB,
        ),
        # NVIDIA A100 datasheet, SXM 80 GB: HBM2e 2,039 GB/s; compute as the 40 GB part; 400 W;
        # NVLink 600 GB/s. nvidia-smi reports 81920 MiB for A100-SXM4-80GB.
        GpuProfile(
            alias="a100-80gb",
            label="nvidia-a100-80gb",
            product_name="NVIDIA A100-SXM4-80GB",
            memory_bytes=81920 * MiB,
            hbm_bandwidth_bytes_s=2039 * GB,
            bf16_tflops=312.0,
            fp8_tflops=None,
            int8_tops=624.0,
            tdp_w=400,
            interconnect_bytes_s=300 * GB,
        ),
        # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100/), H100 SXM: 80 GB HBM3 at
        # 3.35 TB/s; BF16 1,979 / FP8 3,958 / INT8 3,958 TFLOPS(TOPS) with sparsity; up to 700 W;
        # NVLink 900 GB/s (both ways). nvidia-smi reports 81559 MiB ("NVIDIA H100 80GB HBM3").
        GpuProfile(
            alias="h100",
            label="nvidia-h100-80gb",
            product_name="NVIDIA H100 80GB HBM3",
            memory_bytes=81559 * MiB,
            hbm_bandwidth_bytes_s=3350 * GB,
            bf16_tflops=989.5,
            fp8_tflops=1979.0,
            int8_tops=1979.0,
            tdp_w=700,
            interconnect_bytes_s=450 * GB,
        ),
        # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200/), H200 SXM: 141 GB HBM3e at
        # 4.8 TB/s; tensor rates as H100 SXM; up to 700 W; NVLink 900 GB/s.
        # nvidia-smi reports 143771 MiB.
        GpuProfile(
            alias="h200",
            label="nvidia-h200-141gb",
            product_name="NVIDIA H200",
            memory_bytes=143771 * MiB,
            hbm_bandwidth_bytes_s=4800 * GB,
            bf16_tflops=989.5,
            fp8_tflops=1979.0,
            int8_tops=1979.0,
            tdp_w=700,
            interconnect_bytes_s=450 * GB,
        ),
    )
}

_GPU_NAMES: dict[str, GpuProfile] = {}
for _g in GPUS.values():
    _GPU_NAMES[_g.alias] = _GPU_NAMES[_g.label] = _g
_GPU_NAMES["a100"] = GPUS["a100-40gb"]


def resolve_gpu(name: str) -> GpuProfile:
    """A GPU profile by alias (``h100``) or GKE accelerator label (``nvidia-h100-80gb``)."""
    gpu = _GPU_NAMES.get(name.strip().lower())
    if gpu is None:
        choices = ", ".join(f"{g.alias} ({g.label})" for g in GPUS.values())
        raise ValueError(f"unknown GPU {name!r}; choose one of: {choices}")
    return gpu


# ----------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelProfile:
    """A decoder-only transformer's shape, as its config.json gives it."""

    name: str  # lower-case name used on the command line and in /v1/models
    hf_id: str
    params: int  # total parameters: the model page's safetensors count
    layers: int  # num_hidden_layers
    hidden_size: int
    intermediate_size: int
    attention_heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads (grouped-query attention)
    head_dim: int
    vocab_size: int
    context_length: int  # max_position_embeddings
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # on every other layer (Gemma 2); vLLM still pages all layers

    def kv_bytes_per_token(self, kv_dtype_bytes: float = 2) -> float:
        """K and V of one token over all layers, in bytes (bf16 by default)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_dtype_bytes

    @property
    def embedding_params(self) -> int:
        """Token embedding plus lm_head (counted once when they are tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def weight_bytes(self, dtype: str = "bf16") -> int:
        """Bytes of the weights in ``dtype``. Quantized checkpoints (fp8/int8/int4) keep the
        embedding and lm_head in bf16, as vLLM's fp8, compressed-tensors, AWQ and GPTQ paths do."""
        per_param = WEIGHT_FORMATS[check_dtype(dtype)]
        if per_param >= 2:
            return int(self.params * per_param)
        return int((self.params - self.embedding_params) * per_param + self.embedding_params * 2)

    def params_from_config(self) -> int:
        """Parameter count recomputed from the shape (norms and biases left out, < 0.1 %)."""
        h = self.hidden_size
        q = self.attention_heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        attn = 2 * h * q + 2 * h * kv  # q and o, k and v projections
        mlp = 3 * h * self.intermediate_size  # gate, up, down (SwiGLU / GeGLU)
        return self.layers * (attn + mlp) + self.embedding_params


MODELS: dict[str, ModelProfile] = {
    m.name: m
    for m in (
        # https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json
        # (num_hidden_layers 32, hidden_size 4096, intermediate_size 14336, num_attention_heads 32,
        # num_key_value_heads 8, vocab_size 128256, max_position_embeddings 131072);
        # params: model page, "8.03B params" (safetensors).
        ModelProfile(
            name="llama-3.1-8b",
            hf_id="meta-llama/Llama-3.1-8B-Instruct",
            params=8_030_261_248,
            layers=32,
            hidden_size=4096,
            intermediate_size=14336,
            attention_heads=32,
            kv_heads=8,
            head_dim=128,  # hidden_size / num_attention_heads
            vocab_size=128256,
            context_length=131072,
        ),
        # https://huggingface.co/meta-llama/Llama-3.1-70B-Instruct/blob/main/config.json
        # (80 layers, hidden 8192, intermediate 28672, 64 heads, 8 KV heads, vocab 128256,
        # max_position_embeddings 131072); params: model page, "70.6B params".
        ModelProfile(
            name="llama-3.1-70b",
            hf_id="meta-llama/Llama-3.1-70B-Instruct",
            params=70_553_706_496,
            layers=80,
            hidden_size=8192,
            intermediate_size=28672,
            attention_heads=64,
            kv_heads=8,
            head_dim=128,
            vocab_size=128256,
            context_length=131072,
        ),
        # https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/main/config.json
        # (32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, head_dim 128,
        # vocab 32768, max_position_embeddings 32768, sliding_window null); "7.25B params".
        ModelProfile(
            name="mistral-7b",
            hf_id="mistralai/Mistral-7B-Instruct-v0.3",
            params=7_248_023_552,
            layers=32,
            hidden_size=4096,
            intermediate_size=14336,
            attention_heads=32,
            kv_heads=8,
            head_dim=128,
            vocab_size=32768,
            context_length=32768,
        ),
        # https://huggingface.co/google/gemma-2-9b-it/blob/main/config.json
        # (42 layers, hidden 3584, intermediate 14336, 16 heads, 8 KV heads, head_dim 256,
        # vocab 256000, max_position_embeddings 8192, sliding_window 4096, tied embeddings);
        # "9.24B params".
        ModelProfile(
            name="gemma-2-9b",
            hf_id="google/gemma-2-9b-it",
            params=9_241_705_984,
            layers=42,
            hidden_size=3584,
            intermediate_size=14336,
            attention_heads=16,
            kv_heads=8,
            head_dim=256,
            vocab_size=256000,
            context_length=8192,
            tie_word_embeddings=True,
            sliding_window=4096,
        ),
        # https://huggingface.co/google/gemma-2-27b-it/blob/main/config.json
        # (46 layers, hidden 4608, intermediate 36864, 32 heads, 16 KV heads, head_dim 128,
        # vocab 256000, max_position_embeddings 8192, sliding_window 4096, tied embeddings);
        # "27.2B params".
        ModelProfile(
            name="gemma-2-27b",
            hf_id="google/gemma-2-27b-it",
            params=27_227_128_320,
            layers=46,
            hidden_size=4608,
            intermediate_size=36864,
            attention_heads=32,
            kv_heads=16,
            head_dim=128,
            vocab_size=256000,
            context_length=8192,
            tie_word_embeddings=True,
            sliding_window=4096,
        ),
        # https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
        # (28 layers, hidden 3584, intermediate 18944, 28 heads, 4 KV heads, vocab 152064,
        # max_position_embeddings 32768, untied); "7.62B params".
        ModelProfile(
            name="qwen2.5-7b",
            hf_id="Qwen/Qwen2.5-7B-Instruct",
            params=7_615_616_512,
            layers=28,
            hidden_size=3584,
            intermediate_size=18944,
            attention_heads=28,
            kv_heads=4,
            head_dim=128,
            vocab_size=152064,
            context_length=32768,
        ),
        # https://huggingface.co/Qwen/Qwen2.5-32B-Instruct/blob/main/config.json
        # (64 layers, hidden 5120, intermediate 27648, 40 heads, 8 KV heads, vocab 152064,
        # max_position_embeddings 32768, untied); "32.8B params".
        ModelProfile(
            name="qwen2.5-32b",
            hf_id="Qwen/Qwen2.5-32B-Instruct",
            params=32_763_876_352,
            layers=64,
            hidden_size=5120,
            intermediate_size=27648,
            attention_heads=40,
            kv_heads=8,
            head_dim=128,
            vocab_size=152064,
            context_length=32768,
        ),
    )
}

_MODEL_NAMES: dict[str, ModelProfile] = {}
for _m in MODELS.values():
    _MODEL_NAMES[_m.name] = _MODEL_NAMES[_m.hf_id.lower()] = _m


def resolve_model(name: str) -> ModelProfile:
    """A model profile by its lower-case name (``llama-3.1-8b``) or Hugging Face id."""
    model = _MODEL_NAMES.get(name.strip().lower())
    if model is None:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return model
