"""Count, without a GPU, the operations of one training step that make a CUDA device wait for the host.

On a GPU, reading a value on the host (``.item()``, ``bool(t)``, ``int(t)``, ``torch.equal``, ``nonzero`` and the
boolean indexing built on it, ``unique``) drains the launch queue: the CPU stops queueing kernels until the GPU
has caught up. This script runs our training step (``train_step.py``'s batch, method and path) on the CPU under a
``TorchDispatchMode`` that counts those operations and where in ``hf_sam_peft`` they come from, and every op
dispatched (each costs host time; most launch a kernel on a GPU). Each step is counted twice: with the CPU's row
loops and with the batched forms a GPU takes instead (:mod:`hf_sam_peft.row_loops`). The counts do not depend on
the device; their cost does.

    python benchmarks/host_syncs.py --model tiny --objects 25 --rounds 8 --batch 2
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic import synthetic_rows  # noqa: E402
from train_step import build_model, parse_method, parse_path  # noqa: E402

# ops whose result the host reads (on CUDA: a device-to-host copy and a wait)
HOST_READS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero", "aten::_unique2",
              "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select", "aten::repeat_interleave")


class CountOps(TorchDispatchMode):
    """Counts every dispatched op, and the host reads by op and by the innermost ``hf_sam_peft`` line."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.reads: collections.Counter[str] = collections.Counter()
        self.sources: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func._schema.name
        if name in HOST_READS:
            self.reads[name] += 1
            frames = [f for f in traceback.extract_stack() if f"{os.sep}hf_sam_peft{os.sep}" in f.filename]
            if frames:
                where = frames[-1]
                self.sources[f"{where.filename.split(os.sep + 'hf_sam_peft' + os.sep)[-1]}:{where.lineno}"] += 1
        return func(*args, **(kwargs or {}))


def count_step(method: str, path: str, model: str, batch: int, objects: int, rounds: int, step: int,
               gpu_loops: bool = False) -> CountOps:
    """One training step (forward of every round and backward) of ``method`` on ``path``, counted; ``gpu_loops``:
    with the batched forms a GPU takes instead of the CPU's row loops (:mod:`hf_sam_peft.row_loops`)."""
    import hf_sam_peft
    from hf_sam_peft.row_loops import force_row_by_row
    from hf_sam_peft.training.collate import SamInteractiveCollator
    from hf_sam_peft.speed import prepare_model
    from hf_sam_peft.training.interactive import interactive_loss, prompt_generator, training_prompt_mode

    torch.manual_seed(0)
    options, _ = parse_path(path)
    name, overrides = parse_method(method)
    sam = hf_sam_peft.apply_method(build_model(model, 256), name, **overrides).train()
    prepare_model(sam, options, device="cpu")
    image_size = 256 if model == "tiny" else 1024
    rows = SamInteractiveCollator.from_model(sam)(synthetic_rows(batch, image_size, objects))
    counter = CountOps()
    with force_row_by_row(False if gpu_loops else None), counter:
        loss, _ = interactive_loss(sam, rows, training_prompt_mode(step), n_objects=objects, n_rounds=rounds,
                                   generator=prompt_generator(0, 0, step), options=options)
        loss.backward()
    return counter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "vit_b"])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--path", default="optimized", help="plain, optimized or optimized:key=value,...")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objects", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--top", type=int, default=12, help="how many source lines to list")
    args = parser.parse_args(argv)
    print(f"# {args.method}, {args.path}, {args.model}, batch {args.batch}, {args.objects} objects, "
          f"{args.rounds} rounds")
    print("| step (prompt mode) | loops | ops dispatched | host reads | by op |")
    print("|---|---|---:|---:|---|")
    sources: collections.Counter[str] = collections.Counter()
    for step in (0, 1):  # training alternates point (even steps) and box (odd steps) starts
        for gpu_loops in (False, True):
            counter = count_step(args.method, args.path, args.model, args.batch, args.objects, args.rounds, step,
                                 gpu_loops)
            by_op = ", ".join(f"{name.split('::')[-1]} {n}" for name, n in counter.reads.most_common())
            print(f"| {step} ({'points' if step % 2 == 0 else 'box'}) | {'GPU' if gpu_loops else 'CPU'} | "
                  f"{counter.ops} | {sum(counter.reads.values())} | {by_op} |")
            if gpu_loops:
                sources.update(counter.sources)
    print(f"\nhost reads by source line (both steps, GPU loops), top {args.top}:")
    for where, n in sources.most_common(args.top):
        print(f"  {n:5d}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
