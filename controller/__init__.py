"""kvpilot controller."""
