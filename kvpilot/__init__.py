"""kvpilot: GPU-aware load balancing and autoscaling for LLM inference on Kubernetes."""

__version__ = "0.1.0"
