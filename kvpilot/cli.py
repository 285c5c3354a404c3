"""The one command line: `kvpilot agent|gateway|controller|modelserver|sim|plan|demo ...`.

Each subcommand lives in its own package and is imported only when asked for, so `kvpilot plan`
never pays for aiohttp or Kubernetes imports, and nothing imports torch unless it runs it.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "modelserver": ("modelserver.cli", "run a vLLM-compatible emulated model server"),
    "agent": ("agent.cli", "run the per-node agent (GPU and model-server signals)"),
    "gateway": ("gateway.cli", "run the OpenAI-compatible routing gateway"),
    "controller": ("controller.cli", "run the replica and node-pool autoscaler"),
    "plan": ("controller.plan_cli", "rank GPU type x count x quantization for a model"),
    "sim": ("sim.cli", "simulate a fleet: routing and autoscaling policies"),
    "demo": ("kvpilot.demo", "run the whole system locally on emulated GPUs"),
}


def usage() -> str:
    lines = ["usage: kvpilot COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        from kvpilot import __version__

        print(f"kvpilot {__version__}")
        return 0
    name = args[0]
    if name not in COMMANDS:
        print(f"kvpilot: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
