"""[`TensorCacheParams`]: the fitted memory of `tensor_cache`'s `"learned"` mode, saved apart from the model.

A folder holds two files: `tensor_cache_config.json` (what the parameters were fitted for: the model fingerprint, a
signature of its config, the window, the sinks and the feature size, plus how the fit ran) and
`tensor_cache.safetensors` (per fitted layer `i`: `layers.{i}.q_weight` `[Hq, D, F]`, `layers.{i}.q_bias`
`[Hq, F]`, `layers.{i}.k_weight` `[Hkv, D, F]`, `layers.{i}.k_bias` `[Hkv, F]`, `layers.{i}.decay_logit` `[Hkv]`
(`lam = sigmoid`) and `layers.{i}.write_log` `[Hkv]` (`eta = exp`)). No pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..kernels.fast_weight import LearnedMemory

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "TensorCacheParams", "config_signature", "content_digest"]

CONFIG_NAME = "tensor_cache_config.json"
WEIGHTS_NAME = "tensor_cache.safetensors"
FORMAT_VERSION = 1
_NAMES = ("q_weight", "q_bias", "k_weight", "k_bias", "decay_logit", "write_log")


def config_signature(config) -> dict:
    """What a model's config says about the shapes the memory was fitted for (checked without the weights)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return {
        "model_type": getattr(text, "model_type", None),
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "hidden_size": text.hidden_size,
        "vocab_size": getattr(text, "vocab_size", None),
    }


@dataclass
class TensorCacheParams:
    """The fitted parameters of `tensor_cache`'s `"learned"` memory for one model, window and sinks.

    Args:
        tensors (`dict[str, torch.Tensor]`): Per layer `i`, the float32 tensors named in the module docstring.
        window (`int`): The window the memory was fitted behind.
        sink_tokens (`int`): The sinks it was fitted with.
        features (`int`): `F`, the feature map's size (`2F` features per head).
        model_fingerprint (`str`): [`hf_neuralcache.hooks.fingerprint.model_fingerprint`] of the model fitted on.
        signature (`dict`): [`config_signature`] of that model's config.
        fit (`dict`, *optional*): How the fit ran (texts, tokens, steps, seed, seconds, losses); informative.

    Example:

    ```python
    >>> import torch
    >>> from hf_neuralcache.caches.tensor_cache_params import TensorCacheParams
    >>> from hf_neuralcache.models import tiny_model
    >>> model = tiny_model("llama")
    >>> params = TensorCacheParams.initial(model, window=8, sink_tokens=2, features=4)
    >>> sorted(params.layer(0)._fields)
    ['k_bias', 'k_weight', 'log_decay', 'q_bias', 'q_weight', 'write_rate']
    ```
    """

    tensors: dict[str, torch.Tensor]
    window: int
    sink_tokens: int
    features: int
    model_fingerprint: str
    signature: dict
    fit: dict = field(default_factory=dict)

    # ---- building -------------------------------------------------------------------------------------------------
    @classmethod
    def initial(
        cls, model, window: int, sink_tokens: int, features: int = 16, seed: int = 0, layers: list[int] | None = None
    ) -> TensorCacheParams:
        """Parameters before fitting: random feature maps (std `D**-0.5`), `lam = 0.998`, `eta = exp(-5)`."""
        from ..hooks.fingerprint import model_fingerprint

        signature = config_signature(model.config)
        hq, hkv, d = signature["num_attention_heads"], signature["num_key_value_heads"], signature["head_dim"]
        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for i in range(signature["num_hidden_layers"]) if layers is None else layers:
            tensors[f"layers.{i}.q_weight"] = torch.randn(hq, d, features, generator=generator) * d**-0.5
            tensors[f"layers.{i}.q_bias"] = torch.zeros(hq, features)
            tensors[f"layers.{i}.k_weight"] = torch.randn(hkv, d, features, generator=generator) * d**-0.5
            tensors[f"layers.{i}.k_bias"] = torch.zeros(hkv, features)
            tensors[f"layers.{i}.decay_logit"] = torch.full((hkv,), 6.2)
            tensors[f"layers.{i}.write_log"] = torch.full((hkv,), -5.0)
        return cls(tensors, window, sink_tokens, features, model_fingerprint(model), signature)

    @property
    def layer_indices(self) -> list[int]:
        """The layers that have a fitted memory, ascending."""
        return sorted({int(name.split(".")[1]) for name in self.tensors})

    def layer(self, index: int, device=None) -> LearnedMemory:
        """Layer `index`'s parameters as a [`LearnedMemory`] (float32, on `device`)."""
        get = lambda name: self.tensors[f"layers.{index}.{name}"].to(device=device, dtype=torch.float32)  # noqa: E731
        decay_logit = get("decay_logit")
        return LearnedMemory(
            get("q_weight"),
            get("q_bias"),
            get("k_weight"),
            get("k_bias"),
            torch.nn.functional.logsigmoid(decay_logit),
            torch.exp(get("write_log")),
        )

    # ---- checks ---------------------------------------------------------------------------------------------------
    def check(self, config=None, window: int | None = None, sink_tokens: int | None = None, model=None) -> None:
        """Refuse parameters fitted for another model, window or sinks.

        Args:
            config (`PreTrainedConfig`, *optional*): Checked against the saved config signature (shapes).
            window (`int`, *optional*), sink_tokens (`int`, *optional*): Checked against the fitted ones.
            model (`PreTrainedModel`, *optional*): Checked against the saved model fingerprint (hashes the weights,
                once per model object).

        Raises:
            `ValueError`: saying what differs and what to do.
        """
        where = self.fit.get("source", "these tensor_cache params")
        if window is not None and window != self.window:
            raise ValueError(
                f"{where} were fitted for window={self.window}, got window={window}. A learned memory only fits the "
                f"window it was fitted behind: use window={self.window} or fit again with window={window} "
                "(hf_neuralcache.fit_tensor_cache / `hf-neuralcache tensor-cache fit --window`)."
            )
        if sink_tokens is not None and sink_tokens != self.sink_tokens:
            raise ValueError(
                f"{where} were fitted for sink_tokens={self.sink_tokens}, got sink_tokens={sink_tokens}. Use "
                f"sink_tokens={self.sink_tokens} or fit again."
            )
        fit_again = "Fit the memory for this model (hf_neuralcache.fit_tensor_cache)"
        check_fitted_model(where, self.signature, self.model_fingerprint, fit_again, config=config, model=model)

    # ---- storage --------------------------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "model_signature": self.signature,
            "window": self.window,
            "sink_tokens": self.sink_tokens,
            "features": self.features,
            "feature_map": "hedgehog_softmax",
            "layers": self.layer_indices,
            "fit": self.fit,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `tensor_cache_config.json` and `tensor_cache.safetensors` into `directory` (created if missing)."""
        save_folder(directory, self.tensors, WEIGHTS_NAME, self.config_dict(), CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> TensorCacheParams:
        """Load what [`save_pretrained`] wrote.

        Raises:
            `ValueError`: a missing file, another format version, or missing tensors.
        """
        from safetensors.torch import load_file

        config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        missing = [p for p in (config_path, weights_path) if not os.path.isfile(p)]
        if missing:
            raise ValueError(
                f"expected a tensor_cache params folder with {CONFIG_NAME} and {WEIGHTS_NAME}, missing {missing}. "
                "Write one with TensorCacheParams.save_pretrained or `hf-neuralcache tensor-cache fit --out DIR`."
            )
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: expected format_version {FORMAT_VERSION}, got {config.get('format_version')}."
            )
        tensors = load_file(weights_path)
        expected = [f"layers.{i}.{n}" for i in config["layers"] for n in _NAMES]
        absent = [n for n in expected if n not in tensors]
        if absent:
            raise ValueError(f"{weights_path}: expected tensors {absent[:4]}… for every fitted layer, missing.")
        fit = dict(config.get("fit", {}), source=f"tensor_cache params {os.fspath(directory)!r}")
        return cls(
            tensors,
            config["window"],
            config["sink_tokens"],
            config["features"],
            config["model_fingerprint"],
            config["model_signature"],
            fit,
        )


def check_fitted_model(where: str, signature: dict, fingerprint: str, fit_again: str, config=None, model=None) -> None:
    """Refuse a model whose config signature or weights fingerprint differ from those fitted parameters name.

    Args:
        where (`str`): What the parameters are, for the message.
        signature (`dict`), fingerprint (`str`): The saved [`config_signature`] and model fingerprint.
        fit_again (`str`): What to do instead, for the message.
        config (`PreTrainedConfig`, *optional*), model (`PreTrainedModel`, *optional*): What to check.

    Raises:
        `ValueError`: saying what differs and what to do.
    """
    if config is not None and config_signature(config) != signature:
        diff = {k: (signature.get(k), v) for k, v in config_signature(config).items() if signature.get(k) != v}
        raise ValueError(f"{where} were fitted for another model: (fitted, this model) differ in {diff}. {fit_again}.")
    if model is not None:
        from ..hooks.fingerprint import model_fingerprint

        found = model_fingerprint(model)
        if found != fingerprint:
            raise ValueError(
                f"{where} were fitted for the model with fingerprint {fingerprint[:16]}…, but this model's is "
                f"{found[:16]}… (other weights, dtype or config). {fit_again}, or load the model they were fitted on."
            )


def save_folder(directory, tensors: dict, weights_name: str, config: dict, config_name: str) -> None:
    """Write `tensors` (float32, as safetensors) and `config` (as JSON) into `directory` (created if missing)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    save_file(tensors, os.path.join(directory, weights_name), metadata={"format": "pt"})
    with open(os.path.join(directory, config_name), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


_FILE_DIGESTS: dict[tuple, str] = {}  # (path, device, inode, size, mtime_ns) -> digest


def _file_digest(path: str) -> str:
    import xxhash

    try:
        stat = os.stat(path)
    except OSError:
        return f"missing:{os.fspath(path)}"
    memo = (os.fspath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        digest = xxhash.xxh3_128()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_DIGESTS[memo] = digest.hexdigest()
    return _FILE_DIGESTS[memo]


def content_digest(params, config=None) -> str:
    """A digest of what `params` holds, for cache keys (the prefix cache's): refitting into the same folder changes it.

    Args:
        params (`TensorCacheParams`, `str` or `os.PathLike`): Fitted parameters, their folder (a relative path is
            looked up in `config._name_or_path` first, as the cache does), or a file (`paper_params`).
        config (`PreTrainedConfig`, *optional*): The model's config.

    Returns:
        `str`: hex digest (of the tensors and settings, or of the files' bytes; a missing path gives `missing:PATH`).
    """
    import xxhash

    if isinstance(params, TensorCacheParams):
        settings = {k: v for k, v in params.config_dict().items() if k != "fit"}
        digest = xxhash.xxh3_128(json.dumps(settings, sort_keys=True).encode())
        for name in sorted(params.tensors):
            digest.update(name.encode())
            digest.update(params.tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()
    path = os.fspath(params)
    model_dir = getattr(config, "_name_or_path", "") or ""
    if model_dir and not os.path.isabs(path) and os.path.exists(os.path.join(model_dir, path)):
        path = os.path.join(model_dir, path)
    if os.path.isdir(path):
        return ":".join(_file_digest(os.path.join(path, name)) for name in (CONFIG_NAME, WEIGHTS_NAME))
    return _file_digest(path)
