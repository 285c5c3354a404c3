"""`kvpilot demo` (`make demo`): the whole system running locally on emulated GPUs.

Two emulated nodes, one pool of `llama-3.1-8b` replicas (`kvpilot modelserver`, time-scaled):
"h100-node" with one H100 slot and "l4-node" with two L4 slots. Every part is the real one:

- the controller (`controller.loop.Controller`, `controller.mode: local`) starts the replicas and
  scales the pool between `min_replicas` and one replica per slot on the agents' signals;
- one agent per node (`agent.gpus: emulated`) reads each replica's GPU and engine state;
- the gateway (policy `headroom`) serves http://127.0.0.1:8080/v1 for any OpenAI client, fed by
  the agents' watch streams; the demo's own load goes through it.

The generated configuration (kvpilot.yaml, one agent-<node>.yaml per node) and the components' log
are written to a fresh temporary directory whose path is printed. Outside Kubernetes the gateway's
replica list is static, so the demo plays the part EndpointSlices play in a cluster: it hands the
gateway the replicas that are running and reported healthy by their agent, and takes a replica out
before the controller stops it.

Everything is entered on one `AsyncExitStack`, so it all stops, in reverse order, however the demo
ends (load done, Ctrl-C, SIGTERM, an error); no process is left behind.

Where things are: `fleet.py` the nodes, slots, generated config and the per-slot actuator;
`load.py` the clients; `board.py` what is watched and shown; `run.py` the orchestration.
"""

from __future__ import annotations

from kvpilot.demo.run import main

__all__ = ["main"]
