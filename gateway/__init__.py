"""kvpilot gateway."""
