"""Identities the hooks key their entries with: the model fingerprint and chained token-chunk keys.

The **model fingerprint** hashes everything that changes a model's outputs and can be keyed: every parameter and
buffer (name, dtype, shape and bytes, hashed with xxh3-128), the model class, its config (without the local path and
the transformers version) and hf_neuralcache's storage version. Hashing reads every weight once (about 0.1 s per GB on
a CPU, plus the device-to-host copy for a GPU model), so it is done once per model object and again only when a
check made on **every call** sees a change:

- the module tree is walked (a parameter or buffer replaced by a new object, or its memory moved, is seen at once);
- PyTorch's per-tensor version counters (in-place updates through the parameter itself);
- a fixed sample of up to 64 elements of every parameter and buffer, compared with the sample taken at the last
  hash: in-place edits through `.data` (which bypass the version counters), PEFT merges, EMA updates and
  `load_state_dict` change a weight's elements wholesale and are seen.

What it cannot see, stated plainly: an in-place `.data` edit of only a few elements outside the sample (call
[`refresh_fingerprint`] after such an edit), and code that changes outputs without changing a tensor (a replaced
`forward` method, a monkey-patched function). Forward hooks and forward pre-hooks can change outputs and cannot be
keyed: a model with any (on a module of its own, or registered globally) raises [`UnkeyableModelError`], and the
hooks bypass every cache for that call with one logged reason. Parameters offloaded to the `meta` device by
accelerate are hashed by name, dtype and shape only.

Entry keys are BLAKE2b digests, so a different model, dtype, revision or namespace can never produce the key of
another's entry.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import weakref

import numpy as np
import torch
import xxhash

from .storage import STORAGE_VERSION

__all__ = ["UnkeyableModelError", "chain_key", "model_fingerprint", "digest", "refresh_fingerprint"]

_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash"}
_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Memo
_SAMPLE = 64  # elements of each tensor compared on every call


class UnkeyableModelError(RuntimeError):
    """The model's outputs depend on something the fingerprint cannot key (forward hooks)."""


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


def _identity(tensors: list) -> tuple:
    return tuple((id(t), t._version, t.data_ptr()) for t in tensors)


_positions: dict = {}


_AS_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _readers(tensors: list) -> tuple[list, list]:
    """How to read the sample of each tensor: `(cpu, other)`, `cpu` as `(numpy view, positions)` pairs (elements
    viewed as integers of the same size: numpy indexing costs a fraction of a torch op) and `other` as `(flat tensor,
    positions)` pairs. Valid while the tensors keep their identity (`_identity`)."""
    cpu, other = [], []
    for tensor in tensors:
        if tensor.is_meta or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        index = _positions.get((n, flat.device))
        if index is None:
            generator = torch.Generator().manual_seed(n)
            index = torch.randint(0, n, (min(n, _SAMPLE),), generator=generator).to(flat.device)
            _positions[(n, flat.device)] = index
        integer = _AS_INTEGER.get(flat.element_size())
        if flat.device.type == "cpu" and integer is not None and not flat.is_complex() and tensor.is_contiguous():
            cpu.append((flat.view(integer).numpy(), index.numpy()))
        else:
            other.append((flat, index))
    return cpu, other


def _read(readers: tuple[list, list]) -> bytes:
    """The sampled elements (see [`_readers`]) as bytes; only compared with the previous call's, never stored."""
    cpu, other = readers
    parts = [np.concatenate([view[index].view(np.uint8) for view, index in cpu]).tobytes()] if cpu else []
    per_device: dict = {}
    for flat, index in other:
        per_device.setdefault(flat.device, []).append(flat.index_select(0, index).view(torch.uint8))
    return b"".join([*parts, *(torch.cat(p).cpu().numpy().tobytes() for p in per_device.values())])


def _sample(tensors: list) -> bytes:
    """Up to `_SAMPLE` elements of each tensor at fixed pseudo-random positions, as bytes."""
    return _read(_readers(tensors))


_OBSERVERS = ("transformers.utils.output_capturing",)  # transformers' own hooks that only record outputs


def _changing_hooks(module: torch.nn.Module) -> bool:
    """Whether `module` has forward (pre-)hooks other than transformers' output-capturing ones, which record
    hidden states and attentions for `output_hidden_states=True` and never change an output."""
    hooks = (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    return any(getattr(hook, "__module__", None) not in _OBSERVERS for hook in hooks)


def _walk(model: torch.nn.Module) -> tuple[list, str | None]:
    """One walk of the module tree: every parameter and buffer (parameters first) and the name of the first module
    with forward hooks or forward pre-hooks (or `None`). A plain breadth-first walk: `named_modules` builds a name
    for every module, which costs more than the rest of the check."""
    modules, at = [model], 0
    while at < len(modules):  # breadth first; None children (a removed submodule) are skipped
        modules.extend(modules[at]._modules.values())
        at += 1
        while at < len(modules) and modules[at] is None:
            del modules[at]
    hooked = None
    for module in modules:
        if (module._forward_hooks or module._forward_pre_hooks) and _changing_hooks(module):
            hooked = next((name for name, m in model.named_modules(remove_duplicate=False) if m is module), "?")
            hooked = hooked or type(model).__name__
            break
    params = [t for module in modules for t in module._parameters.values() if t is not None]
    buffers = [t for module in modules for t in module._buffers.values() if t is not None]
    return params + buffers, hooked


class _Memo:
    __slots__ = ("identity", "readers", "sample", "tensors", "value")

    def __init__(self, tensors, identity, readers, sample, value):
        self.tensors, self.identity, self.readers, self.sample, self.value = tensors, identity, readers, sample, value


def _hash_weights(named) -> str:
    h = xxhash.xxh3_128()
    for name, tensor in named:
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.is_meta:
            continue
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.contiguous().reshape(-1).view(torch.uint8)
        h.update(data.numpy().data)
    return h.hexdigest()


def _global_hooks() -> str | None:
    from torch.nn.modules import module as nn_module

    for name in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        if getattr(nn_module, name, None):
            return "global forward hooks are registered (torch.nn.modules.module.register_module_forward_hook)"
    return None


_pinned: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("hf_neuralcache_pinned", default=None)


@contextlib.contextmanager
def pinned(model: torch.nn.Module):
    """Check `model` once (see [`model_fingerprint`]) and answer every fingerprint of it within the block from that
    check: one generate() call checks the weights once, however many caches ask.

    Raises:
        `UnkeyableModelError`: as [`model_fingerprint`].
    """
    token = _pinned.set((model, model_fingerprint(model)))
    try:
        yield
    finally:
        _pinned.reset(token)


def model_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of `model`'s weights, dtype and config (see the module docstring).

    Raises:
        `UnkeyableModelError`: when the model has forward hooks or forward pre-hooks.

    Example:

    ```python
    >>> from hf_neuralcache.models import tiny_model
    >>> from hf_neuralcache.hooks.fingerprint import model_fingerprint
    >>> model = tiny_model("llama")
    >>> model_fingerprint(model) == model_fingerprint(model)
    True
    ```
    """
    pin = _pinned.get()
    if pin is not None and pin[0] is model:
        return pin[1]
    tensors, hooked = _walk(model)
    reason = _global_hooks() or (hooked and f"module {hooked!r} has forward hooks, whose effect cannot be keyed")
    if reason:
        raise UnkeyableModelError(reason)
    identity = _identity(tensors)
    memo = _memo.get(model)
    with torch.no_grad():
        same = memo is not None and memo.identity == identity
        readers = memo.readers if same else _readers(tensors)
        sample = _read(readers)
        if same and memo.sample == sample:
            return memo.value
        config = {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
        weights = _hash_weights(_tensors(model))
        value = digest("hf_neuralcache-model", STORAGE_VERSION, type(model).__qualname__, config, weights)
    _memo[model] = _Memo(tensors, identity, readers, sample, value)
    return value


def refresh_fingerprint(model: torch.nn.Module) -> None:
    """Forget `model`'s fingerprint so that the next call hashes every weight again (after an edit the per-call
    check cannot see: a few elements changed in place through `.data`)."""
    _memo.pop(model, None)


def chain_key(parent: str, tokens) -> str:
    """The key of a token chunk: its parent chunk's key (or the root) chained with its token ids."""
    return digest("chunk", parent, bytes(torch.as_tensor(tokens, dtype=torch.int64).cpu().numpy().tobytes()))
