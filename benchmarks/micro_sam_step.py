"""micro-sam's own interactive training step (``SamTrainer``), timed like ``train_step.py`` times ours.

Runs in the separate peer venv made by ``benchmarks/setup_micro_sam.sh`` (it imports only numpy, torch,
segment_anything, micro_sam and torch_em, never ``hf_sam_peft``). The step is the body of
``SamTrainer._train_epoch_impl``: ``zero_grad``, ``_interactive_train_iteration(x, y)`` inside the
trainer's forward context (torch_em's default mixed precision: bf16 autocast on CPU, fp16 on CUDA), then
the trainer's backprop (backward + AdamW step). The SAM is built from the registry without a checkpoint
(random weights: no download; the cost of a step does not depend on the weight values). Prints one JSON row.

    "${MICRO_SAM_VENV:-../microsam-venv}/bin/python" benchmarks/micro_sam_step.py --method lora --objects 4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic import synthetic_rows  # noqa: E402  (shared with train_step.py: the same batch)


def build_trainer(method: str, model_type: str, device: torch.device, objects: int, rounds: int, mixed: bool):
    from micro_sam.models.peft_sam import PEFT_Sam, LoRASurgery
    from micro_sam.training import SamTrainer
    from micro_sam.training.trainable_sam import TrainableSAM
    from micro_sam.training.util import ConvertToSamInputs
    from segment_anything import sam_model_registry

    sam = sam_model_registry[model_type]()
    if method == "lora":
        sam = PEFT_Sam(sam, rank=32, peft_module=LoRASurgery).sam
    elif method == "freeze_encoder":
        sam.image_encoder.requires_grad_(False)
    elif method != "full_ft":
        raise ValueError(f"method must be full_ft, freeze_encoder or lora, got {method!r}")
    model = TrainableSAM(sam).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    trainer = SamTrainer(
        name="benchmark", train_loader=[], val_loader=[], model=model, optimizer=optimizer, device=device,
        logger=None, mixed_precision=mixed, convert_inputs=ConvertToSamInputs(transform=model.transform, box_distortion_factor=0.025),
        n_objects_per_batch=objects, n_sub_iteration=rounds, mask_prob=0.5, save_root=os.path.join(tempfile.gettempdir(), "micro_sam_benchmark"),
    )
    return trainer, sum(p.numel() for p in params)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--data-size", type=int, default=1024)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-mixed-precision", action="store_true", help="torch_em's mixed_precision=False")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    trainer, trainable = build_trainer(args.method, args.model, device, args.objects, args.rounds, not args.no_mixed_precision)
    rows = synthetic_rows(args.batch, args.data_size, args.objects)
    # micro-sam's loaders give images in [0, 255] (B, C, H, W) and instance labels (B, 1, H, W); min-max to
    # [0, 255] as our collator normalises a float image, so both models see the same pixels
    image = lambda r: (r["image"] - r["image"].min()) / (r["image"].max() - r["image"].min()) * 255.0  # noqa: E731
    x = torch.from_numpy(np.stack([np.repeat(image(r), 3, -1).transpose(2, 0, 1) for r in rows])).float()
    y = torch.from_numpy(np.stack([r["labels"][None] for r in rows]).astype(np.float32))
    if trainer.mixed_precision:
        context = lambda: torch.autocast(device_type=trainer._device_type, dtype=getattr(torch, trainer.mixed_precision_dtype))  # noqa: E731
        backprop = trainer._backprop_mixed
    else:
        import contextlib

        context, backprop = contextlib.nullcontext, trainer._backprop
    trainer.model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer._iteration = step
        trainer.optimizer.zero_grad()
        with context():
            loss = trainer._interactive_train_iteration(x, y)[0]
        backprop(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import micro_sam

    print(json.dumps({
        "method": args.method, "time_per_it": statistics.median(times), "peak_gib": peak, "trainable": trainable,
        "loss": float(loss), "peer": f"micro-sam {micro_sam.__version__}, torch {torch.__version__}",
        "mixed_precision": trainer.mixed_precision_dtype if trainer.mixed_precision else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
