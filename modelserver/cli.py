"""`kvpilot modelserver`: serve one model on emulated GPUs, vLLM-compatible."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import signal
import sys
from typing import NoReturn

from modelserver import profiles
from modelserver.scheduler import Engine, EngineConfig
from modelserver.server import ServerConfig, max_model_len, start_server

PROG = "kvpilot modelserver"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="A vLLM-compatible model server on an emulated GPU.")
    p.add_argument("--model", required=True, help=f"model: {', '.join(profiles.MODELS)}")
    p.add_argument(
        "--gpu",
        required=True,
        help="GPU: GKE label or alias ("
        + ", ".join(f"{g.label}|{g.alias}" for g in profiles.GPUS.values())
        + ")",
    )
    p.add_argument("--gpus", type=_positive_int, default=1, help="tensor-parallel GPUs (default 1)")
    p.add_argument(
        "--dtype",
        default="bf16",
        help=f"weight format: {', '.join(profiles.WEIGHT_FORMATS)} (default bf16)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    p.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        help="run the engine X times faster than real time (default 1)",
    )
    p.add_argument("--max-num-seqs", type=_positive_int, default=256)
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192)
    p.add_argument("--max-model-len", type=_positive_int, default=None)
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9)
    p.add_argument("--num-gpu-blocks-override", type=_positive_int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--seed", type=int, default=0)
    return p


def config_from_args(argv: list[str]) -> ServerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model = profiles.resolve_model(args.model)
    except ValueError as e:
        parser.error(f"--model {args.model!r}: {e}")
    try:
        gpu = profiles.resolve_gpu(args.gpu)
    except ValueError as e:
        parser.error(f"--gpu {args.gpu!r}: {e}")
    if args.dtype not in profiles.WEIGHT_FORMATS:
        parser.error(f"--dtype {args.dtype!r}: choose from {', '.join(profiles.WEIGHT_FORMATS)}")
    engine = EngineConfig(
        model=model,
        gpu=gpu,
        num_gpus=args.gpus,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        max_model_len=args.max_model_len,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        seed=args.seed,
    )
    return ServerConfig(engine=engine, time_scale=args.time_scale, host=args.host, port=args.port)


async def serve(config: ServerConfig, engine: Engine) -> None:
    server = await start_server(config, engine)
    # As vLLM does after start-up: move what start-up built out of the collector's sight. And
    # collect young objects far less often: with hundreds of streams the default threshold (700)
    # ran a collection every few steps, inside Engine.step (which allocates most), and took ~40 %
    # of the step's CPU time (bench/modelserver_overhead.py). Nearly everything here is freed by
    # reference counting, so the rarer collections find little to do.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)
    c = config.engine
    print(
        f"{PROG} {c.model.name} on {c.num_gpus}x {c.gpu.label} listening on {server.url}, "
        f"{server.engine.num_gpu_blocks} KV blocks",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str]) -> int:
    config = config_from_args(argv)
    try:
        engine = Engine(config.engine)  # one line, not a traceback, if the model cannot fit
        cache_tokens = engine.num_gpu_blocks * config.engine.block_size
        if config.engine.max_model_len is None and max_model_len(engine) > cache_tokens:
            # vLLM refuses to start here; an emulator is more useful serving what fits.
            print(
                f"{PROG}: note: the KV cache holds {cache_tokens} tokens, less than "
                f"{config.engine.model.name}'s context of {max_model_len(engine)}: serving "
                f"--max-model-len {cache_tokens}",
                file=sys.stderr,
            )
            engine_config = dataclasses.replace(config.engine, max_model_len=cache_tokens)
            config = dataclasses.replace(config, engine=engine_config)
            engine = Engine(engine_config)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, engine))
    except KeyboardInterrupt:
        pass
    except OSError as e:  # the port is taken, the address is not ours
        print(
            f"{PROG}: error: cannot listen on {config.host}:{config.port}: {e.strerror or e}",
            file=sys.stderr,
        )
        return 1
    return 0
