"""Identities the hooks key their entries with: the model fingerprint and chained token-chunk keys.

The **model fingerprint** hashes everything that changes a model's outputs: every parameter and buffer (name,
dtype, shape and bytes, hashed with xxh3-128), the model class, its config (without the local path and the
transformers version) and hf_neuralcache's storage version. It is computed once per model object and recomputed when
any parameter is modified in place (PyTorch's per-tensor version counters and data pointers are checked on every
use, which is cheap; the module tree is walked again at most once a second to notice a parameter replaced by a new
object); hashing reads every weight once (about 0.1 s per GB on a CPU, plus the device-to-host copy for a GPU model).
Parameters offloaded to the `meta` device by accelerate are hashed by name, dtype and shape only.

Entry keys are BLAKE2b digests, so a different model, dtype, revision or namespace can never produce the key of
another's entry.
"""

from __future__ import annotations

import hashlib
import json
import time
import weakref

import torch
import xxhash

from .storage import STORAGE_VERSION

__all__ = ["chain_key", "model_fingerprint", "digest"]

_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash"}
_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (versions, fingerprint, tensors, walked)
_REWALK_SECONDS = 1.0  # how often the module tree is walked again to notice parameters replaced by new objects


def digest(*parts) -> str:
    """A hex BLAKE2b-128 digest of `parts` (str, bytes or JSON-serializable values), each length-prefixed."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, str):
            data = part.encode()
        elif isinstance(part, bytes | bytearray | memoryview):
            data = bytes(part)
        else:
            data = json.dumps(part, sort_keys=True, default=str).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _tensors(model: torch.nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _versions(tensors: list) -> tuple:
    return tuple((t._version, t.data_ptr()) for t in tensors)


def _hash_weights(model: torch.nn.Module) -> str:
    h = xxhash.xxh3_128()
    for name, tensor in _tensors(model):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.is_meta:
            continue
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.contiguous().reshape(-1).view(torch.uint8)
        h.update(data.numpy().data)
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of `model`'s weights, dtype and config (see the module docstring).

    Example:

    ```python
    >>> from hf_neuralcache.models import tiny_model
    >>> from hf_neuralcache.hooks.fingerprint import model_fingerprint
    >>> model = tiny_model("llama")
    >>> model_fingerprint(model) == model_fingerprint(model)
    True
    ```
    """
    memo = _memo.get(model)
    now = time.monotonic()
    if memo is not None and now - memo[3] < _REWALK_SECONDS and memo[0] == _versions(memo[2]):
        return memo[1]
    tensors = [t for _, t in _tensors(model)]
    versions = _versions(tensors)
    if memo is not None and memo[0] == versions:
        _memo[model] = (versions, memo[1], tensors, now)
        return memo[1]
    config = {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    value = digest("hf_neuralcache-model", STORAGE_VERSION, type(model).__qualname__, config, _hash_weights(model))
    _memo[model] = (versions, value, tensors, now)
    return value


def chain_key(parent: str, tokens) -> str:
    """The key of a token chunk: its parent chunk's key (or the root) chained with its token ids."""
    return digest("chunk", parent, bytes(torch.as_tensor(tokens, dtype=torch.int64).cpu().numpy().tobytes()))
