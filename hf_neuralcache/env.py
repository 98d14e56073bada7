"""The environment variables hf_neuralcache reads, all in this one module.

- `HF_NEURALCACHE_HOME`: the folder for converted models and other files hf_neuralcache keeps between runs;
  defaults to `$XDG_CACHE_HOME/hf_neuralcache`, else `~/.cache/hf_neuralcache`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_home"]


def cache_home() -> Path:
    """The folder where hf_neuralcache keeps files between runs (`HF_NEURALCACHE_HOME`)."""
    explicit = os.environ.get("HF_NEURALCACHE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hf_neuralcache"
