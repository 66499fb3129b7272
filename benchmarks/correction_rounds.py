"""Do corrections help? Per-round IoU of LiteMedSAM before and while fine-tuning, on held-out data.

Trains the demo's setup (LiteMedSAM + LoRA r 16, µSAM's interactive objective, points through the
single-mask output) with ``--rounds`` training rounds per step, and scores the held-out test images with the
paper's protocol (point start at the object's centre, box start, 7 corrections each, no mask input) before
training and every ``--every`` steps. Prints, per checkpoint, the mean IoU per object after each round
(round 0 = the first prompt) plus Point / Box / I_P / I_B mSA, and writes ``rounds.png`` (base and the
last checkpoint) and ``rounds.json`` into ``--out``.

    python benchmarks/correction_rounds.py                                  # the demo's stardist nuclei
    python benchmarks/correction_rounds.py --data ../shared/data/dsb2018_stage1test_fluo_nuclei --steps 75
    python benchmarks/correction_rounds.py --rounds 2 --mask-prob 0.5 --steps 25   # the old demo setting

The data are served as the demo serves them (``hf_sam_peft.demo.demo_data`` with the tiles layout: the packaged
``folder_tiles`` recipe with 256² patches, as ``train --data`` serves a folder): ``train`` trains, ``test`` (else
``val``) is held out and scored as 256² tiles, ``--max-eval-images`` of them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with <split>/images + <split>/labels (default: the demo's nuclei)")
    parser.add_argument("--steps", type=int, default=75, help="training steps, one 256² crop each (default: 75)")
    parser.add_argument("--every", type=int, default=25, help="score the test data every this many steps")
    parser.add_argument("--rounds", type=int, default=8, help="training rounds per step (default: the paper's 8)")
    parser.add_argument("--mask-prob", type=float, default=0.5, help="training mask-input probability (default 0.5)")
    parser.add_argument("--objects", type=int, default=16, help="objects per training step (default 16)")
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate (default: the demo's 3e-4)")
    parser.add_argument("--max-eval-images", type=int, default=4, help="test tiles scored with --data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="correction-rounds", help="where rounds.json and rounds.png go")
    args = parser.parse_args(argv)

    from hf_sam_peft import demo
    from hf_sam_peft.data.epoch import add_epoch_callback
    from hf_sam_peft.evaluation.interactive import evaluate_interactive
    from hf_sam_peft.evaluation.predictor import SamPredictor
    from hf_sam_peft.evaluation.results import format_rounds
    from hf_sam_peft.methods import apply_method
    from hf_sam_peft.modeling.base_models import load_base_model
    from hf_sam_peft.sam_forward.kinds import input_size_of
    from hf_sam_peft.training.trainer import InteractiveTrainingArguments, SamInteractiveTrainer
    from hf_sam_peft.visualization import round_curves_figure

    torch.set_num_threads(args.threads)
    config = demo.DemoConfig(data=args.data, steps=args.steps, n_rounds=args.rounds, max_eval_images=args.max_eval_images,
                             seed=args.seed, layout="tiles")
    model, _ = load_base_model("lite_medsam")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = demo.demo_data(config, input_size_of(model), out)
    print(data.line(), flush=True)
    splits, train = {"test": data.test}, data.train
    scores: dict[str, dict] = {}

    def score(net: torch.nn.Module, name: str) -> None:
        tick = time.perf_counter()
        result = evaluate_interactive(
            SamPredictor(net, point_multimask=False), splits["test"], n_corrections=7, seed=args.seed, progress=False
        )
        scores[name] = result
        print(format_rounds({name: result}), flush=True)
        msa = result["msa"]
        print(f"  mSA: Point {msa['point']:.3f}  I_P {msa['ip']:.3f}  Box {msa['box']:.3f}  I_B {msa['ib']:.3f}"
              f"  ({time.perf_counter() - tick:.0f} s)", flush=True)
        (out / "rounds.json").write_text(json.dumps(
            {"settings": vars(args), "scores": {k: {"rounds": v["rounds"], "msa": v["msa"]} for k, v in scores.items()}},
            indent=1,
        ))

    score(model, "base")
    peft_model = apply_method(model, "lora", **demo.METHOD_OPTIONS["lora"])

    class Score(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step % args.every == 0 or state.global_step == args.steps:
                score(trainer.model.eval(), f"step {state.global_step}")
                trainer.model.train()

    training = InteractiveTrainingArguments(
        output_dir=str(out / "training"), max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        lr_scheduler_kwargs={}, per_device_train_batch_size=1, n_objects=args.objects, n_sub_iterations=args.rounds,
        mask_prob=args.mask_prob, point_multimask=False, eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, evaluate_base=False, logging_steps=max(1, args.every), report_to="none",
        seed=args.seed, data_seed=args.seed, use_cpu=True, disable_tqdm=True,
    )
    trainer = SamInteractiveTrainer(peft_model, args=training, train_dataset=train, callbacks=[Score()])
    add_epoch_callback(trainer, train)
    tick = time.perf_counter()
    trainer.train()
    print(f"training: {time.perf_counter() - tick:.0f} s for {args.steps} steps")
    last = list(scores)[-1]
    figure = round_curves_figure(
        {"LiteMedSAM": scores["base"], f"+ LoRA, {last}": scores[last]},
        title=f"held-out {'nuclei' if args.data is None else Path(args.data).name}: {args.rounds} training rounds",
    )
    figure.savefig(out / "rounds.png")
    print(f"wrote {out / 'rounds.png'} and {out / 'rounds.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
