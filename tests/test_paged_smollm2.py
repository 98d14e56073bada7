"""paged_kv on the embedded SmolLM2-135M-Instruct (fp32, CPU): the same tokens as DynamicCache in every mode."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, assert_same_generation

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "adventures_of_sherlock_holmes.txt"
PAGED = dict(cache_implementation="paged_kv", cache_config={"page_size": 16})


@pytest.fixture(scope="module")
def prompt(smollm):
    _, tokenizer = smollm
    if DATA.exists():
        text = DATA.read_text(encoding="utf-8-sig")[5000:7000]
    else:  # the shared data sits beside the checkout; keep the suite runnable without it
        text = " ".join(f"Sentence {i} of a long and winding story about a detective." for i in range(40))
    return tokenizer(text, return_tensors="pt").input_ids[:, :40]  # 2 full pages and a partly filled one


@contextlib.contextmanager
def attention(model, name):
    """Run with another attention implementation, then restore the shared model's own."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def test_greedy_with_the_paged_kernels(smollm, prompt):
    model, _ = smollm
    with attention(model, "neuralcache"):  # the kernels' reference on the CPU, pages read through the table
        assert_same_generation(model, prompt, 16, 1e-4, **PAGED)


def test_seeded_sampling(smollm, prompt):
    model, _ = smollm
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95)
    torch.manual_seed(7)
    ref = model.generate(prompt, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(model.generate(prompt, **PAGED, **kwargs), ref)


def test_beam_search(smollm, prompt):
    model, _ = smollm
    kwargs = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False)
    kwargs.update(return_dict_in_generate=True, output_scores=True)
    ref = model.generate(prompt, **kwargs)
    out = model.generate(prompt, **PAGED, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert_close(out.sequences_scores, ref.sequences_scores, 1e-4, "beam scores")
    pages = out[CACHE_KWARG].pages
    assert pages.pages_in_use <= 3 + 3 * 2  # the prompt's 3 pages once, not once per beam


def test_assisted_decoding(smollm, prompt):
    model, _ = smollm
    assistant = tiny_model("llama", vocab_size=model.config.vocab_size)  # random: most candidates are rejected
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    greedy = model.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, assistant_model=assistant, **PAGED, **kwargs), greedy)
