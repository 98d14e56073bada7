"""Registration with transformers: names, errors, idempotence, version guard, save/load, device maps, threads."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DynamicCache,
    GenerationConfig,
    masking_utils,
)
from transformers.generation import configuration_utils
from transformers.generation.utils import GenerationMixin

import hf_neuralcache
from hf_neuralcache import (
    CACHE_KWARG,  # "cache" from transformers 5.24, else "past_key_values"
    registry,
)
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close

IDS = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def test_available_caches_lists_every_name_with_a_line():
    caches = hf_neuralcache.available_caches()
    assert sorted(caches) == ["paged_kv", "sliding_window_kv", "tensor_cache"]
    assert "not implemented yet" not in caches["paged_kv"] and "not implemented yet" not in caches["sliding_window_kv"]
    assert all(isinstance(line, str) and line for line in caches.values())


def test_register_is_idempotent():
    prepare, preprocess = GenerationMixin._prepare_cache_for_generation, masking_utils._preprocess_mask_arguments
    registry.register()
    registry.register()
    assert GenerationMixin._prepare_cache_for_generation is prepare
    assert masking_utils._preprocess_mask_arguments is preprocess
    names = configuration_utils.ALL_CACHE_IMPLEMENTATIONS
    assert len(names) == len(set(names)) and "sliding_window_kv" in names


@pytest.mark.parametrize(
    "attr",
    [
        (masking_utils, "_preprocess_mask_arguments"),
        (GenerationMixin, "_prepare_cache_for_generation"),
        (configuration_utils, "ALL_CACHE_IMPLEMENTATIONS"),
    ],
    ids=["mask", "prepare_cache", "allow_list"],
)
def test_missing_internals_raise_one_clear_error(monkeypatch, attr):
    owner, name = attr
    monkeypatch.delattr(owner, name)
    with pytest.raises(hf_neuralcache.IncompatibleTransformersError, match=r">=5.17,<6.*lacks"):
        registry.register()


def test_old_transformers_is_refused(monkeypatch):
    monkeypatch.setattr(registry.transformers, "__version__", "5.10.0")
    with pytest.raises(hf_neuralcache.IncompatibleTransformersError, match=r"supports transformers >=5.17,<6"):
        registry.register()


def test_unknown_and_unimplemented_names(monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="sliding_window_kv"):  # transformers' own check lists our names too
        model.generate(IDS, cache_implementation="no_such_cache", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"Unknown hf_neuralcache cache 'dynamic'"):
        hf_neuralcache.create_cache("dynamic", model.config)
    monkeypatch.setitem(registry._CACHES, "paged_kv", (None, "planned"))  # every name is implemented now
    with pytest.raises(NotImplementedError, match=r"available: \['sliding_window_kv', 'tensor_cache'\]"):
        model.generate(IDS, cache_implementation="paged_kv", max_new_tokens=2)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"windw": 8},
            r"Unknown cache_config key\(s\) \['windw'\].*allowed keys: \['max_rollback', 'sink_tokens', 'window'\]",
        ),
        ({"window": 0}, r"cache_config\['window'\] = 0.*expected an int >= 1"),
        ({"window": -3}, r"expected an int >= 1"),
        ({"window": 8.0}, r"expected an int >= 1"),
        ({"window": "8"}, r"expected an int >= 1"),
        ({"window": True}, r"expected an int >= 1"),
        ({"sink_tokens": -1}, r"cache_config\['sink_tokens'\] = -1.*expected an int >= 0"),
    ],
)
def test_bad_cache_config_gets_one_value_error(config, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        model.generate(IDS, cache_implementation="sliding_window_kv", cache_config=config, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        hf_neuralcache.create_cache("sliding_window_kv", model.config, **config)


def test_unsupported_architectures_are_refused():
    t5 = AutoModelForSeq2SeqLM.from_config(
        AutoConfig.for_model(
            "t5", vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
        )
    )
    with pytest.raises(ValueError, match="decoder-only models; 't5' is an encoder-decoder"):
        t5.generate(torch.randint(0, 64, (1, 5)), cache_implementation="sliding_window_kv", max_new_tokens=2)
    mamba = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("mamba", vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)
    )
    with pytest.raises(ValueError, match="supports layers of type"):
        mamba.generate(torch.randint(0, 64, (1, 5)), cache_implementation="sliding_window_kv", max_new_tokens=2)


def test_flash_attention_is_refused_with_a_clear_error():
    model = tiny_model("llama")
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=4)
    model.config._attn_implementation = "flash_attention_2"  # only the mask hook runs before the error
    with pytest.raises(ValueError, match="cannot take; use 'sdpa', 'eager', 'flex_attention' or 'neuralcache'"):
        masking_utils.create_causal_mask(model.config, torch.zeros(1, 3, 8), None, cache)


def test_four_d_mask_with_our_cache_is_refused():
    model = tiny_model("llama")
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=4)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs a 2D padding mask"):
        masking_utils.create_causal_mask(model.config, torch.zeros(1, 3, 8), mask, cache)


def test_transformers_own_caches_are_untouched():
    model = tiny_model("llama")
    kwargs = dict(max_new_tokens=8, do_sample=False)
    default = model.generate(IDS, **kwargs)
    for name in ("dynamic", "static"):
        assert torch.equal(model.generate(IDS, cache_implementation=name, **kwargs), default), name
    # the wrapped mask hook gives transformers' own answer for any other cache
    original = masking_utils._preprocess_mask_arguments.__neuralcache_original__
    cache = DynamicCache(config=model.config)
    args = (model.config, torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.long), cache, None, 0)
    assert repr(masking_utils._preprocess_mask_arguments(*args)) == repr(original(*args))


def test_create_cache_is_what_generate_builds():
    model = tiny_model("llama")
    out = model.generate(
        IDS,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 5, "sink_tokens": 1},
        max_new_tokens=3,
        return_dict_in_generate=True,
    )
    built = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=5, sink_tokens=1)
    assert type(out[CACHE_KWARG]) is type(built)
    assert [repr(layer) for layer in built.layers] == [
        repr(type(layer)(layer.window, layer.sink_tokens)) for layer in out[CACHE_KWARG].layers
    ]


def test_generation_config_survives_save_and_load(tmp_path):
    model = tiny_model("llama")
    model.generation_config.cache_implementation = "sliding_window_kv"
    model.generation_config.cache_config = {"window": 6, "sink_tokens": 2}
    model.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)  # under our own key: plain transformers loads it too
    assert saved.cache_implementation is None and saved.cache_config is None
    assert saved.hf_neuralcache["cache_config"] == {"window": 6, "sink_tokens": 2}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    out = loaded.generate(IDS, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    cache = out[CACHE_KWARG]
    assert isinstance(cache, hf_neuralcache.SlidingWindowKVCache) and cache.layers[0].window == 6
    explicit = model.generate(
        IDS,
        max_new_tokens=12,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 6, "sink_tokens": 2},
    )
    assert torch.equal(out.sequences, explicit)


def test_accelerate_device_map_with_disk_offload(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "model")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    dispatched = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert getattr(dispatched.model.layers[1], "_hf_hook", None) is not None  # accelerate really dispatched it
    kwargs = dict(
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 6},
    )
    assert torch.equal(dispatched.generate(IDS, **kwargs), model.generate(IDS, **kwargs))


def test_threads_and_models_do_not_share_state():
    models = [tiny_model("llama", seed=s, attn_implementation="neuralcache") for s in range(2)]
    kwargs = dict(
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 5, "sink_tokens": 2},
    )
    expected = [m.generate(IDS, **kwargs) for m in models]
    results, errors = {}, []

    def run(i):
        try:
            for r in range(3):
                results[(i, r)] = models[i % 2].generate(IDS, **kwargs)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not torch.equal(expected[0], expected[1])
    for (i, _), out in results.items():
        assert torch.equal(out, expected[i % 2])


def test_manual_loop_with_create_cache_equals_generate():
    model = tiny_model("llama")
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=6, sink_tokens=2)
    seq, steps = IDS[:1], []
    with torch.no_grad():
        logits = model(seq, **{CACHE_KWARG: cache}).logits[:, -1]
        for _ in range(15):
            steps.append(logits)
            token = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            logits = model(token, **{CACHE_KWARG: cache}).logits[:, -1]
    out = model.generate(
        IDS[:1],
        max_new_tokens=15,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 6, "sink_tokens": 2},
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, seq)
    for step, (a, b) in enumerate(zip(out.logits, steps, strict=True)):
        assert_close(a, b, 1e-5, f"step {step}")


def test_from_pretrained_and_set_attn_implementation_accept_neuralcache(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="neuralcache")
    assert loaded.config._attn_implementation == "neuralcache"
    model.set_attn_implementation("neuralcache")
    assert model.config._attn_implementation == "neuralcache"
    kwargs = dict(
        max_new_tokens=10, do_sample=False, cache_implementation="sliding_window_kv", cache_config={"window": 4}
    )
    assert torch.equal(loaded.generate(IDS, **kwargs), tiny_model("llama").generate(IDS, **kwargs))


def test_composite_models_get_their_text_decoder_layers_and_inconsistent_configs_are_refused():
    gemma3 = AutoConfig.for_model(
        "gemma3",
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=300,
            sliding_window=8,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
    )
    cache = hf_neuralcache.create_cache("sliding_window_kv", gemma3)
    assert len(cache.layers) == 2  # the text decoder's layers (see test_compat for generate on composite models)
    qwen2 = AutoConfig.for_model(
        "qwen2", num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=None
    )
    with pytest.raises(ValueError, match="sliding_window=None; expected an int >= 1"):
        hf_neuralcache.create_cache("sliding_window_kv", qwen2)


def test_cache_config_must_be_a_dict():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="must be a dict of options, got list"):
        model.generate(IDS, cache_implementation="sliding_window_kv", cache_config=[8], max_new_tokens=2)
