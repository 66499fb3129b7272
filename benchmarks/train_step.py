"""Time per training iteration and peak memory of µSAM's interactive objective: plain vs optimized, vs micro-sam.

Each (method, path) runs in its own process (so peak memory is that run's alone) on one synthetic batch of
disc objects (``benchmarks/synthetic.py``): the image encoder once, ``--rounds`` prompt rounds, backward,
AdamW step; time/it is the median after ``--warmup`` iterations, CPU time/it the same for the process's CPU
time (all its threads; less sensitive than wall time to other processes on a shared machine). CPU peak memory
is the process's peak RSS; on CUDA, peak allocated memory. ``--repeats N`` runs each method's peer and paths N
times, interleaved, and reports the fastest time and the largest peak memory of each.

Methods: a name, or ``name@lastK`` for the method's adapters in the last ``K`` encoder blocks only (its
``layers`` option, e.g. ``lora@last6``; the lower blocks are frozen and backward stops above them).

Paths: ``plain`` (every efficiency option off: float32, no checkpointing, AdamW without fused kernel),
``optimized`` (``EfficiencyOptions()`` defaults + fused AdamW), or ``optimized:key=value,...`` (defaults with
some options changed, e.g. ``optimized:checkpoint_encoder=False``). Where the micro-sam venv exists
(``benchmarks/setup_micro_sam.sh``), micro-sam's own ``SamTrainer`` step runs on the same batch
(``benchmarks/micro_sam_step.py``) for full_ft, freeze_encoder and lora, and the table gives our time and
memory relative to it. The peer venv: ``--peer-python PYTHON``, else ``$MICRO_SAM_VENV/bin/python``, else the
``microsam-venv`` beside the repository checkout (``<checkout>/../microsam-venv``, where
``setup_micro_sam.sh`` puts it by default); ``--peer-python ''`` skips the peer.

    python benchmarks/train_step.py --model tiny --image-size 256            # CPU, seconds per method
    MICRO_SAM_VENV=../microsam-venv python benchmarks/train_step.py --model vit_b --objects 4 --methods lora,freeze_encoder,full_ft
    python benchmarks/train_step.py --model vit_b --objects 25 --batch 2 --device cuda
    python benchmarks/train_step.py --model vit_b --methods lora,lora@last6,lora@last2 --paths optimized --peer-python ''
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queues
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_info import isa_line, isa_summary  # noqa: E402
from synthetic import synthetic_rows  # noqa: E402

ALL_METHODS = ("full_ft", "freeze_encoder", "ln_tune", "bias_tune", "attn_tune", "lora", "qlora", "adaptformer", "ssf", "fact")
PEER_METHODS = ("full_ft", "freeze_encoder", "lora")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_peer_python() -> str:
    """The micro-sam venv's python: ``$MICRO_SAM_VENV/bin/python``, else ``<checkout>/../microsam-venv/bin/python``."""
    venv = os.environ.get("MICRO_SAM_VENV") or os.path.join(os.path.dirname(REPOSITORY), "microsam-venv")
    return os.path.join(venv, "bin", "python")


def build_model(model: str, image_size: int):
    from transformers import SamModel

    from hf_sam_peft.modeling.sam import sam_config, tiny_sam_config

    if model == "tiny":
        return SamModel(tiny_sam_config(image_size=image_size))
    return SamModel(sam_config(model))


def parse_method(spec: str) -> tuple[str, dict]:
    """``name`` or ``name@lastK`` -> (method name, ``apply_method`` overrides)."""
    name, _, where = spec.partition("@")
    if not where:
        return name, {}
    if not where.startswith("last") or not where[4:].isdigit() or int(where[4:]) < 1:
        raise ValueError(f"method must be 'name' or 'name@lastK' (e.g. lora@last6), got {spec!r}")
    return name, {"layers": list(range(-int(where[4:]), 0))}


def parse_path(path: str):
    """``plain`` / ``optimized`` / ``optimized:key=value,...`` -> (EfficiencyOptions, fused optimizer)."""
    from hf_sam_peft.speed import EfficiencyOptions

    if path == "plain":
        return EfficiencyOptions.plain(), False
    name, _, spec = path.partition(":")
    if name != "optimized":
        raise ValueError(f"path must be 'plain', 'optimized' or 'optimized:key=value,...', got {path!r}")
    changes, fused = {}, True
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        parsed = {"true": True, "false": False, "none": None}.get(value.lower(), int(value) if value.isdigit() else value)
        if key == "fused":
            fused = bool(parsed)
        else:
            changes[key] = parsed
    return EfficiencyOptions(**changes), fused


def measure(method: str, path: str, opts: dict, queue) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(opts["threads"])
    import hf_sam_peft
    from hf_sam_peft.training.collate import SamInteractiveCollator
    from hf_sam_peft.speed import EmbeddingCache, optimizer_kwargs, prepare_model
    from hf_sam_peft.training.interactive import interactive_loss, prompt_generator, training_prompt_mode

    device = torch.device(opts["device"])
    options, fused = parse_path(path)
    try:
        name, overrides = parse_method(method)
        model = hf_sam_peft.apply_method(build_model(opts["model"], opts["image_size"]), name, **overrides)
    except Exception as exc:  # e.g. QLoRA without 4-bit support on this machine
        queue.put({"method": method, "path": path, "error": str(exc).splitlines()[0][:100]})
        return
    model.to(device).train()
    prepare_model(model, options)
    trainable, _ = hf_sam_peft.count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **optimizer_kwargs(device, fused))
    collate = SamInteractiveCollator.from_model(model)
    batch = collate(synthetic_rows(opts["batch"], opts["data_size"], opts["objects"]))
    batch = {k: v.to(device) for k, v in batch.items()}
    cache = EmbeddingCache() if options.cache_embeddings else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step(step: int) -> torch.Tensor:
        generator = prompt_generator(0, 0, step, device=device)
        loss, _ = interactive_loss(
            model, batch, training_prompt_mode(step), n_objects=opts["objects"], n_rounds=opts["rounds"],
            generator=generator, options=options, embedding_cache=cache,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times, cpu_times, losses = [], [], []
    for step in range(opts["warmup"] + opts["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = train_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= opts["warmup"]:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        losses.append(float(loss.detach()))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if opts.get("profile"):  # after the timed steps (and the peak memory reading): the profiler's cost stays out
        write_profile(opts["profile"], method, path, device, lambda: train_step(opts["warmup"] + opts["steps"]))
    queue.put({"method": method, "path": path, "time_per_it": statistics.median(times),
               "cpu_per_it": statistics.median(cpu_times), "peak_gib": peak, "trainable": trainable, "losses": losses})


def write_profile(folder: str, method: str, path: str, device: torch.device, step: Callable[[], object]) -> str:
    """Profile one more training step and write its operator table (self time, top 40) to
    ``folder/profile_<method>_<path>.txt``; returns the file's path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"profile_{method}_{path}").strip("-") + ".txt"
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, name)
    with open(target, "w") as f:
        f.write(f"# {method}, {path}, {device}: one training step, operators by self time\n")
        f.write(prof.key_averages().table(sort_by=sort_by, row_limit=40))
    return target


def result_of(proc, queue, method: str, path: str) -> dict:
    """The measuring process's row, or an error row once it has died without one (an import error or a crash
    there must end the table's row, not hang the benchmark)."""
    while True:
        try:
            return queue.get(timeout=2)
        except queues.Empty:
            if not proc.is_alive():
                try:
                    return queue.get(timeout=2)  # a row sent just before exiting
                except queues.Empty:
                    return {"method": method, "path": path,
                            "error": f"the measuring process died (exit code {proc.exitcode}); see its traceback above"}


def measure_peer(method: str, args, python: str) -> dict:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "micro_sam_step.py")
    command = [python, script, "--method", method, "--model", args.model, "--batch", str(args.batch),
               "--data-size", str(args.data_size or 1024), "--objects", str(args.objects), "--rounds", str(args.rounds),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "path": "micro-sam", "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:100]}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "path": "micro-sam"}


def best_of(kept: dict | None, row: dict) -> dict:
    """Two runs of one (method, path) as one row: the faster run's times, the larger peak memory (a failed run
    yields to a successful one)."""
    if kept is None or "error" in kept:
        return row
    if "error" in row:
        return kept
    best = dict(min(kept, row, key=lambda r: r["time_per_it"]))
    best["peak_gib"] = max(kept["peak_gib"], row["peak_gib"])
    if "cpu_per_it" in kept and "cpu_per_it" in row:
        best["cpu_per_it"] = min(kept["cpu_per_it"], row["cpu_per_it"])
    best["runs"] = kept.get("runs", 1) + 1
    return best


def format_row(row: dict, peer: dict | None) -> str:
    if "error" in row:
        return f"| {row['method']} | {row['path']} | — | unavailable: {row['error']} | — | — | — | — |"
    ratio_t = ratio_m = "—"
    if peer is not None and "error" not in peer and row["path"] != "micro-sam":
        ratio_t = f"{row['time_per_it'] / peer['time_per_it']:.2f}×"
        ratio_m = f"{row['peak_gib'] / peer['peak_gib']:.2f}×"
    cpu = f"{row['cpu_per_it']:.1f}" if "cpu_per_it" in row else "—"  # (the micro-sam peer reports wall time only)
    return (f"| {row['method']} | {row['path']} | {row['trainable']:,} | {row['time_per_it']:.2f} | {cpu} | "
            f"{row['peak_gib']:.2f} | {ratio_t} | {ratio_m} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--image-size", type=int, default=256, help="model input size (tiny only; ViTs use 1024)")
    parser.add_argument("--data-size", type=int, default=None, help="size of the synthetic image (default: input size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help="comma-separated names, each optionally name@lastK (adapters in the last K encoder blocks)")
    parser.add_argument("--paths", default="plain,optimized", help="';'-separated: plain;optimized;optimized:k=v,...")
    parser.add_argument("--peer-python", default=None,
                        help="python of the micro-sam venv ('' to skip; default: $MICRO_SAM_VENV/bin/python, else "
                             "../microsam-venv/bin/python beside the checkout)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each method's peer and paths this many times, interleaved, and report each one's "
                             "fastest time and largest peak memory (for machines whose speed drifts within minutes)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the timed steps, profile one more step of each of our runs and write its "
                             "operator table to DIR/profile_<method>_<path>.txt (the timings exclude it)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    for method in args.methods.split(","):
        parse_method(method)  # a bad spec fails before any run
    if args.peer_python is None:
        args.peer_python = default_peer_python()
    image_size = args.image_size if args.model == "tiny" else 1024
    args.data_size = args.data_size or image_size
    opts = dict(
        model=args.model, image_size=image_size, data_size=args.data_size, batch=args.batch,
        objects=args.objects, rounds=args.rounds, steps=args.steps, warmup=args.warmup, threads=args.threads,
        device=args.device, profile=args.profile,
    )
    paths = [p for p in args.paths.replace(";", "\n").replace(",plain", "\nplain").replace(",optimized", "\noptimized").split("\n") if p]
    use_peer = bool(args.peer_python) and os.path.exists(args.peer_python) and args.model != "tiny"
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({args.threads} threads)"
    print(f"# {args.model}, input {image_size}², batch {args.batch}, {args.objects} objects, {args.rounds} rounds, "
          f"{device_name}; median of {args.steps} steps after {args.warmup} warm-up"
          f"{f', fastest of {args.repeats} interleaved runs (peak memory: the largest)' if args.repeats > 1 else ''}; "
          "ratios are ours / micro-sam's; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    if not args.device.startswith("cuda"):
        print(isa_line())
    print("| method | path | trainable params | time/it (s) | CPU time/it (s) | peak memory (GiB) | time vs micro-sam | "
          "memory vs micro-sam |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    sys.stdout.flush()
    ctx = mp.get_context("spawn")
    rows = []
    for method in args.methods.split(","):
        peer, ours = None, {}
        for _ in range(args.repeats):
            if use_peer and method in PEER_METHODS:
                peer = best_of(peer, measure_peer(method, args, args.peer_python))
            for path in paths:
                queue = ctx.Queue()
                proc = ctx.Process(target=measure, args=(method, path, opts, queue))
                proc.start()
                ours[path] = best_of(ours.get(path), result_of(proc, queue, method, path))
                proc.join()
        if peer is not None:
            rows.append(peer)
            print(format_row(peer, None))
        for path in paths:
            rows.append(ours[path])
            print(format_row(ours[path], peer))
        sys.stdout.flush()
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"options": opts, "device": device_name, "isa": isa_summary(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
