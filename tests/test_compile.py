"""torch.compile of the decode step: one graph for every step, the same tokens and logits as eager decoding.

CPU tests trace with `backend="eager"` (dynamo only, no code generation) and `fullgraph=True`, which fails on any
graph break; a counting backend proves that the ring filling, wrapping and deduplicating its sinks recompiles
nothing. The GPU test runs inductor with CUDA graphs, as `generate` does by default.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import hf_neuralcache
from hf_neuralcache.models import tiny_model
from hf_neuralcache.registry import CACHE_KWARG  # `cache` from transformers 5.24, else `past_key_values`
from hf_neuralcache.testing import assert_close

CACHES = {"sliding_window_kv": "sdpa", "tensor_cache": "neuralcache"}


def _ids(batch, length, seed=0, vocab=256):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def _decode(forward, model, cache, ids, padding, steps):
    """Greedy decoding after an eager prefill; `forward` runs the one-token steps. Returns (tokens, logits)."""
    position = (padding.long().cumsum(-1) - 1).clamp(min=0)
    mask = padding.long()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=position, **{CACHE_KWARG: cache}).logits[:, -1]
        tokens, all_logits = [], []
        position = position[:, -1:]
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            all_logits.append(logits)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            torch._dynamo.mark_dynamic(mask, 1)  # the 2D mask grows by one column a step
            position = position + 1
            step = dict(input_ids=token, attention_mask=mask, position_ids=position, **{CACHE_KWARG: cache})
            logits = forward(**step).logits[:, -1]
    return torch.cat(tokens, 1), torch.stack(all_logits)


def compiled_vs_eager(model, name: str, config: dict, what: str, steps: int = 14):
    """Greedy decode steps after a left-padded 5-token prompt, through `torch.compile(fullgraph=True)` and eagerly,
    each with a fresh cache `name` of `config`: one graph traced, the same tokens, logits within 1e-6. Returns the
    two caches `(compiled, eager)` for the caller's checks of their state."""
    ids, padding = _ids(2, 5), torch.ones(2, 5, dtype=torch.bool)
    padding[0, :2] = False
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model.forward, backend=counting, fullgraph=True)
    eager = hf_neuralcache.create_cache(name, model.config, **config)
    ours = hf_neuralcache.create_cache(name, model.config, **config)
    assert ours.is_compileable
    want_tokens, want_logits = _decode(model.forward, model, eager, ids, padding, steps)
    got_tokens, got_logits = _decode(compiled, model, ours, ids, padding, steps)
    assert len(graphs) == 1
    assert torch.equal(got_tokens, want_tokens)
    assert_close(got_logits, want_logits, 1e-6, f"{what} compiled vs eager")
    return ours, eager


@pytest.mark.parametrize("name", sorted(CACHES))
def test_compiled_decode_step_is_one_graph_and_equals_eager(name):
    """Left padding, a prompt shorter than the window: the decode steps fill the ring, wrap it and evict into the
    memory (tensor_cache), all in the one graph traced at the first step."""
    model = tiny_model("llama", attn_implementation=CACHES[name])
    ours, eager = compiled_vs_eager(model, name, {"window": 6, "sink_tokens": 2}, name)
    # the state the compiled steps advanced reads back in eager code
    assert ours.get_seq_length() == eager.get_seq_length() == 5 + 14
    for a, b in zip(ours.layers, eager.layers, strict=True):
        assert torch.equal(a.length, b.length) and torch.equal(getattr(a, "ring", a).slots, getattr(b, "ring", b).slots)


def test_compiled_decode_step_learned_mode_equals_eager():
    """mode="learned": the same one graph for every step (ring filling, wrapping, evicting into the learned memory)
    and the tokens, logits and memory state of eager decoding."""
    model = tiny_model("llama", attn_implementation="neuralcache")
    params = hf_neuralcache.TensorCacheParams.initial(model, window=6, sink_tokens=2, features=4, seed=1)
    for name in params.tensors:  # a memory large enough to change the logits
        if name.endswith("write_log"):
            params.tensors[name].fill_(-1.0)
    config = {"mode": "learned", "params": params, "window": 6, "sink_tokens": 2}
    ours, eager = compiled_vs_eager(model, "tensor_cache", config, "learned")
    assert float(eager.layers[0].state.mass.abs().sum()) > 0  # 19 tokens through a window of 6: memory written
    for a, b in zip(ours.layers, eager.layers, strict=True):
        for x, y in zip(a.state, b.state, strict=True):
            assert_close(x, y, 1e-6, "learned memory state")


def test_generate_with_compile_config_equals_eager_generate():
    """generate compiles the decode steps of a compileable cache (here on the CPU, which it needs to be told)."""
    model = tiny_model("llama")
    kwargs = dict(
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 8, "sink_tokens": 2},
        return_dict_in_generate=True,
        output_logits=True,
    )
    ids = _ids(2, 12, seed=3)
    want = model.generate(ids, **kwargs)
    config = CompileConfig(backend="eager", fullgraph=True, mode="default")
    config._compile_all_devices = True  # generate compiles on accelerators only unless told
    got = model.generate(ids, compile_config=config, **kwargs)
    assert hasattr(model, "_compiled_call")  # the decode steps ran through torch.compile
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(want.logits, got.logits, strict=True)):
        finite = torch.isfinite(a)
        assert_close(b[finite], a[finite], 1e-6, f"logits of step {step}")


def test_crop_and_continue_after_compiled_steps():
    """Eager code after compiled decode steps sees their writes: crop, then the same logits as a fresh cache."""
    model = tiny_model("llama")
    ids = _ids(1, 30, seed=4)
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=6, sink_tokens=2)
    fresh = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=6, sink_tokens=2)
    with torch.no_grad():
        model(ids[:, :4], **{CACHE_KWARG: cache})
        for i in range(4, 6):  # the ring does not wrap yet: crop needs no journal
            compiled(input_ids=ids[:, i : i + 1], position_ids=torch.tensor([[i]]), **{CACHE_KWARG: cache})
        cache.crop(-1)
        assert cache.get_seq_length() == 5
        model(ids[:, :5], cache=fresh)
        a = model(ids[:, 5:9], **{CACHE_KWARG: cache}).logits
        b = model(ids[:, 5:9], cache=fresh).logits
    assert_close(a, b, 1e-6, "after crop")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(CACHES))
def test_inductor_cuda_graphs_decode_equals_eager(name):
    """generate's default compilation (inductor, mode="reduce-overhead") on a GPU: the same greedy tokens."""
    model = tiny_model("llama", attn_implementation=CACHES[name]).cuda()
    ids = _ids(2, 20, seed=5).cuda()
    kwargs = dict(
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        cache_implementation=name,
        cache_config={"window": 8, "sink_tokens": 2},
    )
    want = model.generate(ids, disable_compile=True, **kwargs)
    got = model.generate(ids, compile_config=CompileConfig(fullgraph=True), **kwargs)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(got, want)
