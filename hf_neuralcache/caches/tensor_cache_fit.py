"""[`fit_tensor_cache`]: fit `tensor_cache`'s `"learned"` memory on a frozen model, layer by layer.

Two objectives (`objective=`):

* `"output"` (default): **sequential, student inputs, teacher outputs.** One forward of the frozen model with full
  attention records every decoder layer's output (the teacher). Then layers are fitted bottom-up: layer `i` gets the
  hidden states that the *cached* model produces below it (window + the memory already fitted for layers `< i`), and
  its memory is fitted so that the layer's whole output (attention with window + memory, then `o_proj`, residual and
  MLP, run by the layer's own module on the sampled positions) matches the full-attention model's output of layer
  `i` (MSE with each hidden dimension in units of the teacher's spread). The gradient goes through one layer at a
  time, never through the model. Each layer's memory also corrects the drift that windowing caused below it.
* `"attention"`: attention transfer with teacher inputs (Hedgehog, LoLCATs stage 1): each layer on its own, the
  window merged with the memory fitted to the layer's full attention output given the full model's own q/k/v.
  Measured on SmolLM2 it lowers every layer's attention error yet makes the NLL *worse* than the window alone
  (`docs/tensor_cache.md`): kept for comparison.
"""

from __future__ import annotations

import time

import torch

from ..kernels.fast_weight import LearnedMemory, learned_features, merge_softmax, window_attention_lse
from .tensor_cache_params import TensorCacheParams

__all__ = ["capture_qkv", "chunked_read", "fit_tensor_cache", "save_with_model"]

CAPTURE = "neuralcache_capture"
FIT = "neuralcache_fit"
OBJECTIVES = ("output", "attention")
DISABLED_WRITE_LOG = -30.0  # eta = exp(-30): a layer whose fitted memory did not help keeps an (empty) memory


def _capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA that also records `(query, key, value, scaling)` into `module._neuralcache_capture` when set."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sink = getattr(module, "_neuralcache_capture", None)
    if sink is not None:
        sink.append((query.detach().float().cpu(), key.detach().float().cpu(), value.detach().float().cpu()))
        module._neuralcache_scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _attention_modules(model) -> dict[int, torch.nn.Module]:
    return {m.layer_idx: m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")}


def text_segments(tokenizer, texts: list, segment_tokens: int, max_segments: int) -> list[torch.Tensor]:
    """The first `max_segments` whole segments of `segment_tokens` token ids of `texts` (strings, tokenized, or id
    tensors), read in order as one sequence.

    Raises:
        `ValueError`: if the texts hold fewer than `segment_tokens` tokens.
    """
    as_ids = lambda text: text if isinstance(text, torch.Tensor) else tokenizer(text, return_tensors="pt").input_ids[0]  # noqa: E731
    ids = torch.cat([as_ids(text).view(-1) for text in texts])
    segments = [ids[i : i + segment_tokens] for i in range(0, len(ids) - segment_tokens + 1, segment_tokens)]
    if not segments:
        raise ValueError(f"expected at least {segment_tokens} tokens of text, got {len(ids)}.")
    return segments[:max_segments]


def capture_qkv(model, segments: list[torch.Tensor]) -> tuple[dict[int, tuple[torch.Tensor, ...]], dict[int, float]]:
    """Each attention layer's queries, keys and values over `segments` (full attention, no cache).

    Args:
        model (`PreTrainedModel`): The frozen model.
        segments (`list[torch.LongTensor]`): Token ids `[T]` each, all of the same length.

    Returns:
        `(qkv, scaling)`: per layer index `(q [S, Hq, T, D], k [S, Hkv, T, D], v [S, Hkv, T, Dv])` float32 on the
        CPU, and the layer's attention scaling.
    """
    from ..registry import register_attention

    register_attention(CAPTURE, _capture_attention)
    modules = _attention_modules(model)
    previous = model.config._attn_implementation
    for module in modules.values():
        module._neuralcache_capture = []
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.no_grad():
            for ids in segments:
                model(ids.view(1, -1).to(model.device), use_cache=False)
        qkv = {i: tuple(torch.cat(x, 0) for x in zip(*m._neuralcache_capture, strict=True)) for i, m in modules.items()}
        scaling = {i: float(m._neuralcache_scaling) for i, m in modules.items()}
    finally:
        model.set_attn_implementation(previous)
        for module in modules.values():
            del module._neuralcache_capture
    return qkv, scaling


def _targets(q, k, v, positions, window, sinks, scaling):
    """For the queries at `positions`: the full attention output, and the window's output and log-denominator."""
    t = positions.view(-1, 1)
    j = torch.arange(k.shape[2]).view(1, -1)
    causal = (j <= t).unsqueeze(0)  # [1, q, T]
    in_window = causal & ((j < sinks) | (j > t - window)).unsqueeze(0)
    query = q[:, :, positions]
    full, _ = window_attention_lse(query, k, v, causal, scaling)
    out_w, lse_w = window_attention_lse(query, k, v, in_window, scaling)
    return query, full, out_w, lse_w


def chunked_read(query, keys, values, prefix, memory: LearnedMemory, chunk: int = 64):
    """[`learned_read`] from an empty state with every pair weighted 1, in chunked form (what the fit trains).

    The state after `P` pairs is the state at the chunk boundary `C * (P // C)` (one matmul over per-chunk sums)
    decayed by `lam^(P mod C)`, plus the `P mod C` pairs after it: `O(m 2F Dv + q C (2F + Dv))` work instead of
    the reference's `O(q m (2F + Dv))`. Equal to [`learned_read`] (tested).

    Args:
        query (`[S, Hq, q, D]`), keys (`[S, H, m, D]`), values (`[S, H, m, Dv]`), prefix (`[q]`), memory: As for
            [`learned_read`].
        chunk (`int`, *optional*, defaults to 64): `C`.

    Returns:
        `(out, log_mass)` as [`learned_read`].
    """
    s, h, m, _ = keys.shape
    hq, q = query.shape[1], query.shape[2]
    g, c = hq // h, chunk
    log_decay = memory.log_decay.float()
    fk = learned_features(keys, memory.k_weight, memory.k_bias) * memory.write_rate.float().view(1, h, 1, 1)
    pad = (-m) % c
    fk = torch.nn.functional.pad(fk, (0, 0, 0, pad))
    v = torch.nn.functional.pad(values.float(), (0, 0, 0, pad))
    n = (m + pad) // c
    fk_c, v_c = fk.view(s, h, n, c, -1), v.view(s, h, n, c, -1)  # [S, H, n, C, 2F], [S, H, n, C, Dv]
    i = torch.arange(c)
    w_in = torch.exp(log_decay.view(h, 1) * (c - 1 - i))  # [H, C]
    wk = fk_c * w_in[None, :, None, :, None]
    local_num = torch.einsum("shncf,shncd->shnfd", wk, v_c)  # [S, H, n, 2F, Dv]
    local_mass = wk.sum(3)  # [S, H, n, 2F]
    age = torch.arange(n + 1).view(-1, 1) - 1 - torch.arange(n).view(1, -1)  # [n + 1, n]
    w_b = torch.where(age >= 0, torch.exp(log_decay.view(h, 1, 1) * c * age.clamp(min=0)), 0.0)  # [H, n + 1, n]
    bound_num = torch.einsum("hbn,shnfd->shbfd", w_b, local_num)  # state after b * C pairs
    bound_mass = torch.einsum("hbn,shnf->shbf", w_b, local_mass)
    b = prefix // c
    r = prefix - b * c  # [q]
    fq = learned_features(query, memory.q_weight, memory.q_bias).view(s, h, g, q, -1)  # [S, H, g, q, 2F]
    old = torch.exp(log_decay.view(1, h, 1, 1) * r)  # [1, H, 1, q]
    num = old[..., None] * torch.einsum("shgqf,shqfd->shgqd", fq, bound_num[:, :, b])
    den = old * torch.einsum("shgqf,shqf->shgq", fq, bound_mass[:, :, b])
    inside = b.clamp(max=n - 1)
    age_in = r.view(-1, 1) - 1 - i.view(1, -1)  # [q, C]
    w_q = torch.where(age_in >= 0, torch.exp(log_decay.view(h, 1, 1) * age_in.clamp(min=0)), 0.0)  # [H, q, C]
    scores = torch.einsum("shgqf,shqcf->shgqc", fq, fk_c[:, :, inside]) * w_q[None, :, None]
    num = num + torch.einsum("shgqc,shqcd->shgqd", scores, v_c[:, :, inside])
    den = den + scores.sum(-1)
    empty = den <= 1e-30
    out = torch.where(empty[..., None], 0.0, num / den.clamp(min=1e-30)[..., None])
    log_mass = torch.where(empty, float("-inf"), torch.log(den.clamp(min=1e-30)))
    return out.reshape(s, hq, q, -1), log_mass.reshape(s, hq, q)


def _layer_loss(memory, query, k_mem, v_mem, prefix, full, out_w, lse_w):
    """MSE between the window merged with the memory and the full attention (every evicted pair in one chunk)."""
    mem, log_mass = chunked_read(query, k_mem, v_mem, prefix, memory)
    out, _ = merge_softmax(out_w, lse_w, mem, lse_w + log_mass)
    return ((out - full) ** 2).mean()


def _fit_layer(qkv, scaling, init, window, sinks, steps, batch, lr, generator, pool_size=2048):
    q, k, v = qkv
    T = k.shape[2]
    candidates = torch.arange(sinks + window, T)
    pool = candidates[torch.randperm(len(candidates), generator=generator)[:pool_size]].sort().values
    with torch.no_grad():  # targets of the pool's queries, once: full attention, window output and log-denominator
        query, full, out_w, lse_w = _targets(q, k, v, pool, window, sinks, scaling)
    prefix = pool - window + 1 - sinks
    raw = {name: init[name].clone().requires_grad_(True) for name in init}
    optimizer = torch.optim.Adam(list(raw.values()), lr=lr)
    k_mem, v_mem = k[:, :, sinks:], v[:, :, sinks:]

    def memory():
        return LearnedMemory(
            raw["q_weight"], raw["q_bias"], raw["k_weight"], raw["k_bias"],
            torch.nn.functional.logsigmoid(raw["decay_logit"]), torch.exp(raw["write_log"]),
        )  # fmt: skip

    def loss_at(rows):
        return _layer_loss(
            memory(), query[:, :, rows], k_mem, v_mem, prefix[rows], full[:, :, rows], out_w[:, :, rows],
            lse_w[:, :, rows],
        )  # fmt: skip

    every = torch.arange(len(pool))
    with torch.no_grad():
        window_mse = float(((out_w - full) ** 2).mean())
        start_mse = float(loss_at(every))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        rows = torch.randperm(len(pool), generator=generator)[:batch].sort().values
        loss = loss_at(rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        end_mse = float(loss_at(every))
    fitted = {name: t.detach().clone() for name, t in raw.items()}
    return fitted, {"window_mse": window_mse, "start_mse": start_mse, "fitted_mse": end_mse}


class _Captured(Exception):
    """Raised by the fit's attention function once it has recorded a layer's q/k/v (the rest is not needed)."""


_CONTEXT: dict = {}  # the fit's attention mode: "teacher", "capture", "student" or "rows" (set around each call)


def _fit_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function of the `"output"` fit; what it does depends on `_CONTEXT["mode"]`.

    * `"teacher"`: SDPA (full attention; a sliding layer gets its own mask).
    * `"capture"`: records `(q, k, v, scaling)` and stops the layer ([`_Captured`]).
    * `"student"`: window (+ sinks) merged with `_CONTEXT["memory"]` for every query, as the cache computes it
      (a layer the cache keeps exact, `_CONTEXT["exact"]`, stays SDPA).
    * `"rows"`: returns `_CONTEXT["rows_out"]` (computed by the fit for the sampled positions) and ignores its inputs.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mode = _CONTEXT.get("mode", "teacher")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    if mode == "rows":
        return _CONTEXT["rows_out"].transpose(1, 2).to(query.dtype), None
    if mode == "capture":
        _CONTEXT["qkv"] = (query.detach().float(), key.detach().float(), value.detach().float(), float(scaling))
        _CONTEXT["softcap"] = softcap
        raise _Captured
    if mode == "student" and not _CONTEXT.get("exact"):
        window, sinks, memory = _CONTEXT["window"], _CONTEXT["sinks"], _CONTEXT["memory"]
        memory = memory.get(module.layer_idx) if isinstance(memory, dict) else memory  # per layer, or this layer's
        out = _student_attention(query, key, value, scaling, window, sinks, memory, softcap)
        return out.transpose(1, 2).to(query.dtype).contiguous(), None
    if softcap is not None:  # SDPA has no soft-capping: the model's own eager attention
        import sys

        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _window_lse(query, key, value, rows, window, sinks, scaling, softcap=None):
    """Window (+ sinks) softmax of the queries at positions `rows` (ascending), over the keys they can see only."""
    lo, hi = max(sinks, int(rows[0]) - window + 1), int(rows[-1]) + 1
    keys = torch.cat([torch.arange(min(sinks, hi)), torch.arange(lo, hi)]) if lo < hi else torch.arange(min(sinks, hi))
    keys = keys.to(key.device)
    t, j = rows.view(-1, 1).to(key.device), keys.view(1, -1)
    visible = ((j <= t) & ((j < sinks) | (j > t - window))).unsqueeze(0)
    return window_attention_lse(query, key[:, :, keys], value[:, :, keys], visible, scaling, softcap)


def _merged(out_w, lse_w, query, key, value, rows, window, sinks, memory):
    """The window's output merged with `memory`'s read of the pairs evicted before each query at `rows`."""
    if memory is None:
        return out_w
    prefix = (rows - window + 1 - sinks).clamp(0, key.shape[2] - sinks)
    mem, log_mass = chunked_read(query, key[:, :, sinks:], value[:, :, sinks:], prefix.to(key.device), memory)
    return merge_softmax(out_w, lse_w, mem, lse_w + log_mass)[0]


def _student_attention(query, key, value, scaling, window, sinks, memory, softcap=None, block: int = 256):
    """What the cache computes for a whole sequence (window + sinks merged with `memory`), block by block."""
    outs = []
    for start in range(0, query.shape[2], block):
        rows = torch.arange(start, min(query.shape[2], start + block))
        q = query[:, :, start : start + block]
        out_w, lse_w = _window_lse(q, key, value, rows, window, sinks, scaling, softcap)
        outs.append(_merged(out_w, lse_w, q, key, value, rows, window, sinks, memory))
    return torch.cat(outs, 2)


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers, in order (each with a `self_attn` that has a `layer_idx`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = list(getattr(decoder, "layers", []))
    if not layers or not all(hasattr(getattr(layer, "self_attn", None), "layer_idx") for layer in layers):
        raise ValueError(
            f"fit_tensor_cache(objective='output') needs a decoder with `layers` whose `self_attn` has a `layer_idx` "
            f"(Llama-style models); {type(model).__name__} has none. Use objective='attention'."
        )
    return layers


class _LayerCall:
    """How the model called one decoder layer (everything but the hidden states), to call it again on its own."""

    def __init__(self, args, kwargs, length: int):
        self.args, self.kwargs, self.length = args, kwargs, length

    def __call__(self, layer, hidden, rows=None):
        kwargs = dict(self.kwargs)
        if rows is not None:  # the sampled positions only: slice what runs along the sequence
            kwargs = {name: self._slice(value, rows) for name, value in kwargs.items()}
            kwargs["attention_mask"] = None  # the "rows" attention ignores it
        if "hidden_states" in self.kwargs:
            kwargs["hidden_states"] = hidden
            out = layer(*self.args, **kwargs)
        else:
            out = layer(hidden, *self.args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _slice(self, value, rows):
        if isinstance(value, tuple):
            return tuple(self._slice(v, rows) for v in value)
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == self.length:
            return value[rows.to(value.device)]
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == self.length:
            return value[:, rows.to(value.device)]
        return value


def _teacher(model, segments: torch.Tensor):
    """Full-attention forward over `segments` `[S, T]`: each layer's input call and every layer's output."""
    from ..registry import register_attention

    register_attention(FIT, _fit_attention)
    layers = _decoder_layers(model)
    calls, outputs, first_input = [None] * len(layers), [None] * len(layers), []
    handles = []
    for i, layer in enumerate(layers):

        def before(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                first_input.append(hidden.detach())
            calls[i] = _LayerCall(args[1:], {k: v for k, v in kwargs.items()}, segments.shape[1])

        def after(module, args, output, i=i):
            outputs[i] = (output[0] if isinstance(output, tuple) else output).detach()

        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after))
    previous = model.config._attn_implementation
    _CONTEXT.clear()
    _CONTEXT["mode"] = "teacher"
    model.set_attn_implementation(FIT)
    try:
        with torch.no_grad():
            model(segments.to(model.device), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
        for handle in handles:
            handle.remove()
    return layers, calls, first_input[0], outputs


def _fit_layer_output(
    layer, call, hidden, target, memory_init, window, sinks, steps, batch, lr, generator, pool_size,
    segments_per_step=2,
):  # fmt: skip
    """Fit one layer's memory so that the layer's output on the student's `hidden` matches `target` (teacher's)."""
    T = hidden.shape[1]
    _CONTEXT.update(mode="capture")
    try:
        with torch.no_grad():
            call(layer, hidden)
    except _Captured:
        pass
    q, k, v, scaling = _CONTEXT.pop("qkv")
    candidates = torch.arange(sinks + window, T)
    pool = candidates[torch.randperm(len(candidates), generator=generator)[:pool_size]].sort().values
    with torch.no_grad():
        query = q[:, :, pool.to(q.device)]
        out_w, lse_w = _window_lse(query, k, v, pool, window, sinks, scaling, _CONTEXT.pop("softcap", None))
        inputs, targets = hidden[:, pool.to(hidden.device)], target[:, pool.to(target.device)]
    raw = {name: t.clone().to(q.device).requires_grad_(True) for name, t in memory_init.items()}
    # each hidden dimension in units of the teacher's spread over the sampled positions, so that the few dimensions
    # with massive activations do not dominate the loss (plain MSE fitted them and made Sherlock's NLL worse)
    scale = targets.float().std(dim=(0, 1)).clamp(min=1e-3)
    n_segments = hidden.shape[0]
    # with 3 segments or more the last one is held out: the losses reported and the switch-off decision use it
    held_out = torch.tensor([n_segments - 1]) if n_segments >= 3 else torch.arange(n_segments)
    training = torch.arange(n_segments - 1) if n_segments >= 3 else torch.arange(n_segments)

    def memory():
        return LearnedMemory(
            raw["q_weight"], raw["q_bias"], raw["k_weight"], raw["k_bias"],
            torch.nn.functional.logsigmoid(raw["decay_logit"]), torch.exp(raw["write_log"]),
        )  # fmt: skip

    def loss_at(segs, rows, with_memory=True):
        out = out_w[segs][:, :, rows]
        if with_memory:
            out = _merged(
                out, lse_w[segs][:, :, rows], query[segs][:, :, rows], k[segs], v[segs], pool[rows], window, sinks,
                memory(),
            )  # fmt: skip
        _CONTEXT.update(mode="rows", rows_out=out)
        y = call(layer, inputs[segs][:, rows], rows=pool[rows])
        return (((y.float() - targets[segs][:, rows].float()) / scale) ** 2).mean()

    every = torch.randperm(len(pool), generator=generator)[: 2 * batch].sort().values  # the losses reported
    with torch.no_grad():
        window_loss, start_loss = float(loss_at(held_out, every, with_memory=False)), float(loss_at(held_out, every))
    optimizer = torch.optim.Adam(list(raw.values()), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        segs = training[torch.randperm(len(training), generator=generator)[:segments_per_step]].sort().values
        rows = torch.randperm(len(pool), generator=generator)[:batch].sort().values
        loss = loss_at(segs, rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        end_loss = float(loss_at(held_out, every))
    _CONTEXT.pop("rows_out", None)
    fitted = {name: t.detach().cpu().clone() for name, t in raw.items()}
    disabled = end_loss >= window_loss
    if disabled:  # the memory did not beat the window alone on this layer: switch its writes off
        fitted["write_log"] = torch.full_like(fitted["write_log"], DISABLED_WRITE_LOG)
    stats = {"window_mse": window_loss, "start_mse": start_loss, "fitted_mse": end_loss, "disabled": disabled}
    return fitted, stats


def fit_tensor_cache(
    model,
    tokenizer,
    texts: list,
    window: int = 256,
    sink_tokens: int = 4,
    features: int = 16,
    segment_tokens: int = 4096,
    max_segments: int = 3,
    steps: int = 80,
    batch_queries: int = 256,
    lr: float = 1e-2,
    seed: int = 0,
    objective: str = "output",
    progress: bool = True,
) -> TensorCacheParams:
    """Fit `tensor_cache`'s `"learned"` memory for `model` (frozen) on `texts`, layer by layer.

    Args:
        model (`PreTrainedModel`): The model; its weights are not changed.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Its tokenizer (unused when `texts` are token ids).
        texts (`list[str]` or `list[torch.LongTensor]`): Training text (or its ids `[n]`), concatenated and cut into
            segments of `segment_tokens` tokens.
        window (`int`, *optional*, defaults to 256): The window the memory sits behind.
        sink_tokens (`int`, *optional*, defaults to 4): The sinks.
        features (`int`, *optional*, defaults to 16): `F`; each head's feature map has `2F` features and its state
            `2F x (Dv + 1)` floats.
        segment_tokens (`int`, *optional*, defaults to 4096): Tokens per segment (the positions the fit covers).
        max_segments (`int`, *optional*, defaults to 3): Segments used (from the start of the texts); with 3 or more
            the last is held out (reported losses, switching a layer off).
        steps (`int`, *optional*, defaults to 80): Adam steps per layer.
        batch_queries (`int`, *optional*, defaults to 256): Query positions per step (per segment), drawn from 2,048.
        lr (`float`, *optional*, defaults to 1e-2): Adam's learning rate (cosine schedule).
        seed (`int`, *optional*, defaults to 0): Seeds the initial feature maps and the sampled positions.
        objective (`str`, *optional*, defaults to `"output"`): `"output"` (sequential: each layer's output on the
            cached model's own inputs matched to the full model's) or `"attention"` (each layer's attention on the
            full model's inputs, independently); see the module docstring.
        progress (`bool`, *optional*, defaults to `True`): Show a tqdm bar over the layers.

    Returns:
        [`TensorCacheParams`]: save with `save_pretrained(dir)`; use with
        `cache_config={"mode": "learned", "params": dir, "window": window, "sink_tokens": sink_tokens}`.

    Example:

    ```python
    >>> import torch
    >>> import hf_neuralcache
    >>> from hf_neuralcache.models import tiny_model
    >>> model = tiny_model("llama")
    >>> ids = torch.randint(3, 256, (96,), generator=torch.Generator().manual_seed(0))
    >>> params = hf_neuralcache.fit_tensor_cache(
    ...     model, None, [ids], window=8, sink_tokens=2, features=4, segment_tokens=48, steps=2, progress=False)
    >>> params.window, params.features
    (8, 4)
    ```
    """
    from tqdm.auto import tqdm

    if objective not in OBJECTIVES:
        raise ValueError(f"expected objective in {OBJECTIVES}, got {objective!r}.")
    if window + sink_tokens >= segment_tokens:
        raise ValueError(
            f"expected segment_tokens > window + sink_tokens (the fit needs queries with evicted tokens), got "
            f"segment_tokens={segment_tokens}, window={window}, sink_tokens={sink_tokens}."
        )
    started = time.perf_counter()
    segments = text_segments(tokenizer, texts, segment_tokens, max_segments)
    was_training = model.training
    model.eval()
    # frozen: the loss reaches the memory through the layer, and nothing may leave a `.grad` on the model's weights
    trainable = [(weight, weight.requires_grad) for weight in model.parameters()]
    for weight, _ in trainable:
        weight.requires_grad_(False)
    params = TensorCacheParams.initial(model, window, sink_tokens, features, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    report = {}
    init = lambda i: {n.split(".")[-1]: t for n, t in params.tensors.items() if n.startswith(f"layers.{i}.")}  # noqa: E731
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if objective == "attention":
                qkv, scaling = capture_qkv(model, segments)
                captured = time.perf_counter() - started
                bar = tqdm(sorted(qkv), desc="fit tensor_cache", unit="layer", disable=not progress)
                for i in bar:
                    fitted, stats = _fit_layer(
                        qkv.pop(i), scaling[i], init(i), window, sink_tokens, steps, batch_queries, lr, generator
                    )
                    params.tensors.update({f"layers.{i}.{name}": t for name, t in fitted.items()})
                    report[i] = stats
                    bar.set_postfix(mse=f"{stats['fitted_mse']:.2e}", window=f"{stats['window_mse']:.2e}")
            else:
                captured = _fit_sequential(
                    model, torch.stack(segments), params, init, report, window, sink_tokens, steps, batch_queries,
                    lr, generator, progress,
                )  # fmt: skip
                captured -= started
    finally:
        _CONTEXT.clear()
        model.train(was_training)
        for weight, flag in trainable:
            weight.requires_grad_(flag)
    params.fit = {
        "objective": objective,
        "segments": len(segments),
        "segment_tokens": segment_tokens,
        "steps": steps,
        "batch_queries": batch_queries,
        "lr": lr,
        "seed": seed,
        "capture_seconds": round(captured, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "layers": {
            str(i): {k: (v if isinstance(v, bool) else round(v, 8)) for k, v in s.items()} for i, s in report.items()
        },
    }
    return params


def _rounded(value):
    return value if isinstance(value, bool) else round(value, 8)


def _fit_sequential(model, segments, params, init, report, window, sinks, steps, batch, lr, generator, progress):
    """The `"output"` objective: bottom-up, each layer on the hidden states of the cached model below it."""
    from tqdm.auto import tqdm

    from ..registry import decoder_layer_types

    layers, calls, hidden, teacher = _teacher(model, segments)
    captured = time.perf_counter()
    exact = {i for i, (kind, native) in enumerate(decoder_layer_types(model.config, "tensor_cache"))
             if kind == "sliding_attention" and native is not None and native <= window}  # fmt: skip
    previous = model.config._attn_implementation
    model.set_attn_implementation(FIT)
    try:
        bar = tqdm(list(enumerate(layers)), desc="fit tensor_cache", unit="layer", disable=not progress)
        for i, layer in bar:
            index = layer.self_attn.layer_idx
            memory = None
            _CONTEXT.update(window=window, sinks=sinks, exact=index in exact)
            if index not in exact:  # a layer the cache keeps exact (its own window <= ours) has no memory to fit
                fitted, stats = _fit_layer_output(
                    layer, calls[i], hidden, teacher[i], init(index), window, sinks, steps, batch, lr, generator,
                    pool_size=2048,
                )  # fmt: skip
                params.tensors.update({f"layers.{index}.{name}": t for name, t in fitted.items()})
                report[index] = stats
                memory = params.layer(index, device=hidden.device)
                bar.set_postfix(mse=f"{stats['fitted_mse']:.2e}", window=f"{stats['window_mse']:.2e}")
            _CONTEXT.update(mode="student", memory=memory)
            with torch.no_grad():
                hidden = calls[i](layer, hidden)  # what the cached model feeds the next layer
            teacher[i] = None
    finally:
        model.set_attn_implementation(previous)
    return captured


def save_with_model(model_dir: str, params: TensorCacheParams, subfolder: str = "tensor_cache") -> str:
    """Save `params` as `model_dir/subfolder` and make the folder's generation config use them.

    After this, `AutoModelForCausalLM.from_pretrained(model_dir).generate(ids)` (with `import hf_neuralcache`)
    decodes with `tensor_cache` in `"learned"` mode and these parameters, with no other argument.

    Args:
        model_dir (`str`): A model folder (`save_pretrained` output).
        params (`TensorCacheParams`): Fitted for that model.
        subfolder (`str`, *optional*, defaults to `"tensor_cache"`): Where in the folder.

    Returns:
        `str`: the parameters' folder.
    """
    import os

    from transformers import GenerationConfig

    target = os.path.join(model_dir, subfolder)
    params.save_pretrained(target)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig()
    generation.cache_implementation = "tensor_cache"
    generation.cache_config = {
        "mode": "learned", "params": subfolder, "window": params.window, "sink_tokens": params.sink_tokens,
    }  # fmt: skip
    generation.save_pretrained(model_dir)
    return target
