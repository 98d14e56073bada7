"""Generate a few tokens with each of our caches on a tiny random llama; prints one `ok` line per cache.

Run as a script by the packaging and dependency tests, in this venv or in a fresh one:

    python tests/generate_smoke.py                  # as installed
    python tests/generate_smoke.py --no-triton      # as if triton were not installed (macOS, Windows)
    python tests/generate_smoke.py --old-triton     # as if triton were older than 3.4 (no `triton.knobs`)
"""

from __future__ import annotations

import argparse
import importlib.abc
import sys

CACHES = {
    "paged_kv": {"page_size": 4},
    "sliding_window_kv": {"window": 8, "sink_tokens": 2},
    "tensor_cache": {"window": 8, "sink_tokens": 2},
}


class _BlockTriton(importlib.abc.MetaPathFinder):
    """Makes `import triton` fail as it does where triton is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--no-triton", action="store_true", help="Block `import triton`.")
    what.add_argument("--old-triton", action="store_true", help="A `triton` module without `knobs`.")
    args = parser.parse_args()
    if args.no_triton:
        sys.meta_path.insert(0, _BlockTriton())
    if args.old_triton:
        import triton

        del triton.knobs  # triton < 3.4 has no `knobs` (and reads TRITON_INTERPRET itself)

    import torch

    import hf_neuralcache
    from hf_neuralcache.models import tiny_model

    torch.set_num_threads(1)
    model = tiny_model("llama", attn_implementation="neuralcache")  # tensor_cache needs it
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    for name, config in CACHES.items():
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                cache_implementation=name, cache_config=config,
            )  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        assert len(new) == 6, (name, new)
        print(f"ok {name} {new}")
    if args.no_triton:
        assert "triton" not in sys.modules, "something imported triton"
    print(f"hf_neuralcache {hf_neuralcache.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
