"""kvpilot modelserver."""
