"""Time per training iteration and peak memory of µSAM's interactive objective, per fine-tuning method.

Each method runs in its own process (so peak memory is that method's alone) on one synthetic batch of disc
objects: the image encoder once, `--rounds` prompt rounds, backward, AdamW step; time/it is the median after
`--warmup` iterations. CPU peak memory is the process's peak RSS; on CUDA, peak allocated memory.

    python benchmarks/train_step.py --model tiny --image-size 256            # CPU, seconds per method
    python benchmarks/train_step.py --model vit_b --image-size 1024 --objects 25 --batch 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

import numpy as np
import torch

ALL_METHODS = ("full_ft", "freeze_encoder", "ln_tune", "bias_tune", "attn_tune", "lora", "qlora", "adaptformer", "ssf", "fact")


def synthetic_rows(batch: int, size: int, n_objects: int, seed: int = 0) -> list[dict]:
    """Grey images with `n_objects` bright discs each, and their instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for _ in range(batch):
        labels = np.zeros((size, size), np.int32)
        radius = max(3, size // (4 * int(np.ceil(np.sqrt(n_objects)))))
        for i in range(n_objects):
            cy, cx = rng.integers(radius, size - radius, 2)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i + 1
        image = (labels > 0).astype(np.float32) * 0.7 + rng.normal(0.2, 0.05, (size, size)).astype(np.float32)
        rows.append({"image": image[..., None], "labels": labels})
    return rows


def build_model(model: str, image_size: int):
    from transformers import SamModel

    from hf_sam_peft.modeling.sam import sam_config, tiny_sam_config

    if model == "tiny":
        return SamModel(tiny_sam_config(image_size=image_size))
    config = sam_config(model)
    return SamModel(config)


def measure(method: str, opts: dict, queue) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(opts["threads"])
    import hf_sam_peft
    from hf_sam_peft.training.collate import SamInteractiveCollator
    from hf_sam_peft.training.interactive import interactive_loss, prompt_generator, training_prompt_mode

    device = torch.device(opts["device"])
    try:
        model = hf_sam_peft.apply_method(build_model(opts["model"], opts["image_size"]), method)
    except Exception as exc:  # e.g. QLoRA without 4-bit support on this machine
        queue.put({"method": method, "error": str(exc).splitlines()[0][:100]})
        return
    model.to(device).train()
    trainable, _ = hf_sam_peft.count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)
    collate = SamInteractiveCollator.from_model(model)
    batch = collate(synthetic_rows(opts["batch"], opts["data_size"], opts["objects"]))
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(opts["warmup"] + opts["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generator = prompt_generator(0, 0, step, device=device)
        loss, _ = interactive_loss(
            model, batch, training_prompt_mode(step), n_objects=opts["objects"], n_rounds=opts["rounds"],
            generator=generator,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= opts["warmup"]:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    queue.put({"method": method, "time_per_it": statistics.median(times), "peak_gib": peak, "trainable": trainable})


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
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    image_size = args.image_size if args.model == "tiny" else 1024
    opts = dict(
        model=args.model, image_size=image_size, data_size=args.data_size or image_size, batch=args.batch,
        objects=args.objects, rounds=args.rounds, steps=args.steps, warmup=args.warmup, threads=args.threads,
        device=args.device,
    )
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({args.threads} threads)"
    print(f"# {args.model}, input {image_size}², batch {args.batch}, {args.objects} objects, {args.rounds} rounds, "
          f"{device_name}; median of {args.steps} steps after {args.warmup} warm-up")
    print("| method | trainable params | time/it (s) | peak memory (GiB) |")
    print("|---|---:|---:|---:|")
    ctx = mp.get_context("spawn")
    rows = []
    for method in args.methods.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(method, opts, queue))
        proc.start()
        row = queue.get()
        proc.join()
        rows.append(row)
        if "error" in row:
            print(f"| {method} | — | unavailable: {row['error']} | — |")
        else:
            print(f"| {method} | {row['trainable']:,} | {row['time_per_it']:.3f} | {row['peak_gib']:.2f} |")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"options": opts, "device": device_name, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
