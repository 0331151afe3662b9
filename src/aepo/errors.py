"""The project's error types, at the bottom of the import graph so every layer can raise them."""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and what is accepted."""
