"""The ``pyro-llm`` command line."""

from .main import cli

__all__ = ["cli"]
