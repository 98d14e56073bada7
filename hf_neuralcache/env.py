"""The environment variables hf_neuralcache reads, all in this one module.

- `HF_NEURALCACHE_HOME`: the folder for converted models and other files hf_neuralcache keeps between runs;
  defaults to `$XDG_CACHE_HOME/hf_neuralcache`, else `~/.cache/hf_neuralcache`.
- `HF_NEURALCACHE_SECRET`: the key with which the prefix, inference and semantic caches MAC every entry they write
  and verify every entry they read (HMAC-SHA256), when no `secret=` argument is given; unset: entries carry only a
  checksum. Set the same value in every process that shares a folder.
- `HF_NEURALCACHE_REDIS_USERNAME`, `HF_NEURALCACHE_REDIS_PASSWORD`: the credentials of a Redis remote tier whose URL
  carries none (never logged).
- `TRITON_INTERPRET`: Triton's own switch; when it is `1` the kernels of `hf_neuralcache.kernels` run on CPU tensors
  through Triton's interpreter (for tests) instead of the PyTorch reference.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_home", "cache_secret", "redis_credentials", "triton_interpret"]


def cache_home() -> Path:
    """The folder where hf_neuralcache keeps files between runs (`HF_NEURALCACHE_HOME`)."""
    explicit = os.environ.get("HF_NEURALCACHE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hf_neuralcache"


def triton_interpret() -> bool:
    """Whether Triton's interpreter is on (`TRITON_INTERPRET=1`): the kernels then also run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cache_secret() -> str | None:
    """The MAC key of the disk caches' entries (`HF_NEURALCACHE_SECRET`), or `None` when unset or empty."""
    return os.environ.get("HF_NEURALCACHE_SECRET") or None


def redis_credentials() -> tuple[str | None, str | None]:
    """`(username, password)` for a Redis URL without them (`HF_NEURALCACHE_REDIS_USERNAME` /
    `HF_NEURALCACHE_REDIS_PASSWORD`); each `None` when unset or empty."""
    username = os.environ.get("HF_NEURALCACHE_REDIS_USERNAME") or None
    return username, os.environ.get("HF_NEURALCACHE_REDIS_PASSWORD") or None
