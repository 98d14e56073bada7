"""Tiny composite (vision-language) models and their inputs, built without hf_neuralcache.

Imported by tests in-process and by subprocesses that must never import hf_neuralcache, so this module imports
only torch and transformers.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

TEXT = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)  # fmt: skip
IMAGE_TOKEN = 7
COMPOSITE = ("gemma3", "llava", "qwen2_vl")
TEXT_ONLY = ("llama", "qwen2", "gemma2", "gemma3_text")


def _config(name: str):
    if name == "gemma3":
        layer_types = ["sliding_attention", "full_attention"] * 2
        text = {**TEXT, "num_hidden_layers": 4, "sliding_window": 4, "layer_types": layer_types}
        return AutoConfig.for_model(
            "gemma3", text_config=text, vision_config=VISION, mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN,
            boi_token_index=8, eoi_token_index=9,
        )  # fmt: skip
    if name == "llava":
        return AutoConfig.for_model(
            "llava", text_config={"model_type": "llama", **TEXT}, image_token_index=IMAGE_TOKEN,
            vision_config={"model_type": "clip_vision_model", **VISION, "projection_dim": 32},
        )  # fmt: skip
    if name == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)  # fmt: skip
        text = {**TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4}}
        return AutoConfig.for_model(
            "qwen2_vl", text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, vision_start_token_id=8,
            vision_end_token_id=9, video_token_id=10,
        )  # fmt: skip
    text_overrides = {"gemma2": {"num_hidden_layers": 4, "sliding_window": 4}, "gemma3_text": {"sliding_window": 4}}
    return AutoConfig.for_model(name, **{**TEXT, **text_overrides.get(name, {})})


def tiny(name: str, attn_implementation: str = "sdpa", seed: int = 0):
    """A random-weight model of family `name` (one of `COMPOSITE` or `TEXT_ONLY`) in eval mode."""
    config = _config(name)
    auto = AutoModelForImageTextToText if name in COMPOSITE else AutoModelForCausalLM
    if name == "gemma2":
        attn_implementation = "eager"  # soft-capping
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def inputs(name: str, batch: int = 2) -> dict:
    """generate() inputs: a prompt with one image (4 image tokens in the text, 1 for Qwen2-VL) for composite models,
    left padding in the second row."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(11, 300, (batch, 12), generator=g)
    mask = torch.ones_like(text)
    if batch > 1:
        text[1, :2], mask[1, :2] = 0, 0
    out = {"input_ids": text, "attention_mask": mask}
    if name not in COMPOSITE:
        return out
    n_image = 1 if name == "qwen2_vl" else 4
    image = torch.full((batch, n_image), IMAGE_TOKEN)
    start, end = torch.full((batch, 1), 8), torch.full((batch, 1), 9)
    ids = torch.cat([text[:, :4], start, image, end, text[:, 4:]], 1)
    out["input_ids"], out["attention_mask"] = ids, torch.cat([mask[:, :4], torch.ones(batch, n_image + 2,
                                                                dtype=mask.dtype), mask[:, 4:]], 1)  # fmt: skip
    if name == "qwen2_vl":
        out["pixel_values"] = torch.randn(batch * 4, 3 * 2 * 14 * 14, generator=g)
        out["image_grid_thw"] = torch.tensor([[1, 2, 2]] * batch)
    else:
        out["pixel_values"] = torch.randn(batch, 3, 28, 28, generator=g)
    if name == "gemma3":
        out["token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return out


def greedy(model, name: str, **kwargs) -> list[list[int]]:
    """Token ids of a greedy generate() call (8 new tokens) on `inputs(name)`."""
    with torch.no_grad():
        out = model.generate(**inputs(name), max_new_tokens=8, min_new_tokens=8, do_sample=False, **kwargs)
    return out.tolist()
