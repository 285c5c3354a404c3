"""kvpilot sim."""
