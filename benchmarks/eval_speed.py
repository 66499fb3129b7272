"""Speed of interactive evaluation (box / point start + corrections): plain float32 vs fast decoder, vs micro-sam.

Mode ``lite`` (default): LiteMedSAM on the demo's held-out test tile (``hf_sam_peft.demo.stardist_splits``:
the bottom-right 256² tile of the stardist nuclei image, 29 nuclei). The image is encoded once per path
(timed separately); then ``iter_object_rounds`` runs every start with ``--corrections`` corrections through
``SamPredictor(fast=False)`` (today's plain float32 path through ``SamModel.forward``) and
``SamPredictor(fast=True)`` (the default: ``hf_sam_peft.evaluation.fast_decoder``), in one process. Reported:
seconds, object-rounds/s (objects x rounds / seconds of the rounds, encoder excluded), speedup, and the
agreement of the two paths: per round, both predictors answer the *same* prompts (the plain path's
trajectory), giving the mean / minimum per-object IoU between their masks and the max abs difference of
their low-res logits; and the mSA of the whole evaluation (``evaluate_interactive``) with each path.

Mode ``vit_b``: a seeded random-weight ViT-B ``SamModel`` exported to segment_anything's layout
(``hf_sam_peft.modeling.convert.export_to_segment_anything``); the same tile and objects go through ours
(plain and fast) and, in the micro-sam venv (``benchmarks/setup_micro_sam.sh``; ``--peer-python`` or
``$MICRO_SAM_VENV``, as ``train_step.py``), through micro-sam's
``_run_inference_with_iterative_prompting_for_image`` (``micro_sam/evaluation/inference.py``, the per-image
body of ``run_inference_with_iterative_prompting``) with the image embedding precomputed, so only the
prompting rounds are timed on both sides. The peer part of this file imports no ``hf_sam_peft``.

    OMP_NUM_THREADS=1 python benchmarks/eval_speed.py                          # LiteMedSAM, demo tile
    OMP_NUM_THREADS=1 MICRO_SAM_VENV=../microsam-venv python benchmarks/eval_speed.py --mode vit_b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_info import isa_line  # noqa: E402

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_peer_python() -> str:
    """As ``train_step.py``: ``$MICRO_SAM_VENV/bin/python``, else ``<checkout>/../microsam-venv/bin/python``."""
    venv = os.environ.get("MICRO_SAM_VENV") or os.path.join(os.path.dirname(REPOSITORY), "microsam-venv")
    return os.path.join(venv, "bin", "python")


# --------------------------------------------------------------------------------------------- ours


def demo_tile() -> tuple[np.ndarray, np.ndarray]:
    from hf_sam_peft.demo import stardist_nuclei, stardist_splits

    row = stardist_splits(*stardist_nuclei())["test"][0]
    return np.asarray(row["image"]), np.asarray(row["labels"])


def time_rounds(predictor, image, labels, starts, corrections, batch_size, seed=0) -> dict:
    """Encoder seconds, and per start the rounds' seconds and final masks (flat indices per round)."""
    from hf_sam_peft.evaluation.interactive import _STREAMS, _run_image
    from hf_sam_peft.sam_forward.seeding import prompt_generator

    ids = np.unique(labels)
    ids = ids[ids != 0]
    start_time = time.perf_counter()
    predictor.set_image(image)
    out = {"encoder_s": time.perf_counter() - start_time, "objects": int(ids.size)}
    for start in starts:
        start_time = time.perf_counter()
        _run_image(predictor, labels, ids, start, corrections, batch_size, prompt_generator(seed, _STREAMS[start], 0))
        out[start] = time.perf_counter() - start_time
    return out


def agreement(plain, fast, labels, starts, corrections, batch_size) -> dict:
    """Per start: both predictors answer the plain path's prompts each round; mean / min per-object mask IoU
    and the max abs difference of low-res logits over all rounds."""
    from hf_sam_peft.evaluation.interactive import _STREAMS, iter_object_rounds
    from hf_sam_peft.sam_forward.seeding import prompt_generator

    ids = np.unique(labels)
    ids = ids[ids != 0]
    result = {}
    for start in starts:
        ious, max_diff = [], 0.0
        generator = prompt_generator(0, _STREAMS[start], 0)
        label_tensor = torch.from_numpy(labels)
        for first in range(0, ids.size, batch_size):
            gt = label_tensor[None] == torch.from_numpy(ids[first : first + batch_size])[:, None, None]
            for r in iter_object_rounds(plain, gt, start, corrections, generator):
                prompts = {"points": r.points, "labels": r.labels, "boxes": r.boxes}
                multimask = start == "point" and r.index == 0
                low_p, _ = plain._decode_low_res(multimask=multimask, **prompts)
                low_f, _ = fast._decode_low_res(multimask=multimask, **prompts)
                max_diff = max(max_diff, float((low_p - low_f).abs().max()))
                mask_f = fast.predict_best(multimask=multimask, **prompts)
                inter = (mask_f & r.masks).flatten(1).sum(-1).double()
                union = (mask_f | r.masks).flatten(1).sum(-1).double()
                ious += torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).tolist()
        result[start] = {"mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious)), "max_abs_logit": max_diff}
    return result


def msa_of(predictor, image, labels, starts, corrections, batch_size) -> dict:
    from hf_sam_peft.evaluation.interactive import evaluate_interactive

    out = evaluate_interactive(predictor, [{"image": image, "labels": labels}], corrections, starts, batch_size=batch_size, progress=False)
    return {key: out["msa"][key] for key in out["msa"]}


def table(rows: list[dict], starts, corrections) -> str:
    lines = ["| model | path | encoder s | " + " | ".join(f"{s} rounds s" for s in starts) + " | object-rounds/s | speedup |",
             "|---" * (5 + len(starts)) + "|"]
    base = {}
    for row in rows:
        n_or = row["objects"] * (corrections + 1) * len(starts)
        seconds = sum(row[s] for s in starts)
        rate = n_or / seconds
        base.setdefault(row["model"], rate)
        lines.append(f"| {row['model']} | {row['path']} | {row['encoder_s']:.2f} | " + " | ".join(f"{row[s]:.2f}" for s in starts)
                     + f" | {rate:.1f} | {rate / base[row['model']]:.2f}x |")
    return "\n".join(lines)


def vit_b_model(seed: int):
    from transformers import SamModel

    from hf_sam_peft.modeling.sam import sam_config

    torch.manual_seed(seed)
    return SamModel(sam_config("vit_b")).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("lite", "vit_b"), default="lite")
    parser.add_argument("--starts", default="box,point")
    parser.add_argument("--corrections", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="time every path this many times, interleaved, and report each one's fastest run "
                             "(on a shared machine single runs vary by 30%%)")
    parser.add_argument("--no-agreement", action="store_true", help="skip the agreement and mSA runs")
    parser.add_argument("--peer-python", default=None, help="micro-sam venv python ('' skips the peer; vit_b mode)")
    parser.add_argument("--as-peer", default=None, help=argparse.SUPPRESS)  # run micro-sam's side (peer venv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    starts = tuple(s for s in args.starts.split(",") if s)
    if args.as_peer:
        return peer_main(args.as_peer, starts, args)

    from hf_sam_peft.evaluation.predictor import SamPredictor
    from hf_sam_peft.sam_forward.precision import native_autocast_dtype

    image, labels = demo_tile()
    if args.mode == "lite":
        from hf_sam_peft.modeling.base_models import load_base_model

        model, name = load_base_model("lite_medsam")[0].eval(), "LiteMedSAM"
        point_multimask = False  # as the demo evaluates it
    else:
        model, name = vit_b_model(args.seed), "ViT-B (random)"
        point_multimask = True
    plain = SamPredictor(model, point_multimask=point_multimask, fast=False)
    fast = SamPredictor(model, point_multimask=point_multimask)
    paths = [("plain float32", plain), ("fast", fast)]
    if native_autocast_dtype("cpu") is not None:  # the opt-in bf16 decoder, where the CPU computes bf16 natively
        paths.append(("fast bf16", SamPredictor(model, point_multimask=point_multimask, bf16=True)))
    print(isa_line())
    print(f"torch threads: {torch.get_num_threads()}; native bf16: "
          f"{native_autocast_dtype('cpu')}; tile {image.shape}, {int(np.unique(labels).size - 1)} objects", flush=True)
    rows = {}
    for repeat in range(args.repeats):  # paths interleaved; each keeps its fastest run of every start
        for path, predictor in paths:
            run = {"model": name, "path": path, **time_rounds(predictor, image, labels, starts, args.corrections, args.batch_size)}
            print(json.dumps({"repeat": repeat, **run}), flush=True)
            best = rows.setdefault(path, run)
            for key in ("encoder_s", *starts):
                best[key] = min(best[key], run[key])
    rows = list(rows.values())
    if args.mode == "vit_b":
        peer = default_peer_python() if args.peer_python is None else args.peer_python
        if peer and os.path.exists(peer):
            rows.append(run_peer(peer, model, image, labels, starts, args))
            print(json.dumps(rows[-1]), flush=True)
        else:
            print(f"micro-sam peer skipped (no python at {peer!r}; bash benchmarks/setup_micro_sam.sh)")
    print()
    print(table(rows, starts, args.corrections))
    if not args.no_agreement:
        fast.set_image(image)
        plain.set_image(image)
        agree = agreement(plain, fast, labels, starts, args.corrections, args.batch_size)
        msa = {path: msa_of(p, image, labels, starts, args.corrections, args.batch_size) for path, p in paths}
        print()
        print("| start | mean per-object IoU fast vs plain (same prompts) | min IoU | max abs low-res logit diff |")
        print("|---|---|---|---|")
        for start, a in agree.items():
            print(f"| {start} | {a['mean_iou']:.4f} | {a['min_iou']:.4f} | {a['max_abs_logit']:.3f} |")
        print()
        print("| mSA | " + " | ".join(msa["plain"]) + " |")
        print("|---" * (1 + len(msa["plain"])) + "|")
        for path in msa:
            print(f"| {path} | " + " | ".join(f"{v:.4f}" for v in msa[path].values()) + " |")
    return 0


# --------------------------------------------------------------------------------------------- micro-sam peer


def run_peer(python: str, model, image, labels, starts, args) -> dict:
    """micro-sam's rounds on the same weights (segment_anything layout), tile and objects, in its own venv."""
    from hf_sam_peft.modeling.convert import export_to_segment_anything

    with tempfile.TemporaryDirectory() as tmp:
        weights = export_to_segment_anything(model, os.path.join(tmp, "vit_b.pth"))
        np.save(os.path.join(tmp, "image.npy"), image)
        np.save(os.path.join(tmp, "labels.npy"), labels)
        cmd = [python, os.path.abspath(__file__), "--as-peer", tmp, "--starts", ",".join(starts),
               "--corrections", str(args.corrections), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if done.returncode != 0:
            raise RuntimeError(f"micro-sam peer failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
    del weights
    return row


def peer_main(folder: str, starts, args) -> int:
    """In the micro-sam venv: time ``_run_inference_with_iterative_prompting_for_image`` per start."""
    import micro_sam.util as util
    from micro_sam.evaluation.inference import _run_inference_with_iterative_prompting_for_image
    from segment_anything import SamPredictor, sam_model_registry

    sam = sam_model_registry["vit_b"]()
    sam.load_state_dict(torch.load(os.path.join(folder, "vit_b.pth"), map_location="cpu"))
    predictor = SamPredictor(sam.eval())
    image, labels = np.load(os.path.join(folder, "image.npy")), np.load(os.path.join(folder, "labels.npy"))
    start_time = time.perf_counter()
    # ndim=2: an (H, W, 3) image is one RGB image (micro-sam would take it for a 3-slice volume otherwise)
    embeddings = util.precompute_image_embeddings(predictor, image, None, ndim=2, verbose=False)
    row = {"model": "ViT-B (random)", "path": "micro-sam", "encoder_s": time.perf_counter() - start_time,
           "objects": int(np.unique(labels).size - 1)}
    # batched_inference re-embeds the image every round (embedding_path=None): hand it the one embedding
    util.precompute_image_embeddings = lambda *a, **k: embeddings
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):  # the fastest run of each start, as ours
            for start in starts:
                paths = [os.path.join(out, f"{start}_{i}.tif") for i in range(args.corrections + 1)]
                start_time = time.perf_counter()
                with torch.no_grad():
                    _run_inference_with_iterative_prompting_for_image(
                        predictor, image, labels, start_with_box_prompt=start == "box", dilation=5,
                        batch_size=args.batch_size, embedding_path=None, n_iterations=args.corrections + 1,
                        prediction_paths=paths,
                    )
                row[start] = min(row.get(start, float("inf")), time.perf_counter() - start_time)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
