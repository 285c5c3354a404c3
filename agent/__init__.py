"""kvpilot agent."""
