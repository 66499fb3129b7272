"""Each efficiency option gives the plain path's loss and gradients (within tolerance), on tiny SAMs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_sam_peft import apply_method
from hf_sam_peft.training.collate import SamInteractiveCollator
from hf_sam_peft.speed import (
    EfficiencyOptions,
    EmbeddingCache,
    autocast_context,
    encoder_embeddings,
    prepare_model,
    resolve_autocast_dtype,
    resolve_checkpoint_encoder,
    resolve_mlp_recompute,
    set_encoder_attention,
)
from hf_sam_peft.sam_forward.precision import native_autocast_dtype
from hf_sam_peft.training.interactive import (
    interactive_loss,
    prompt_generator,
    training_prompt_mode,
    unwrap_sam,
)
from tests.training.corrections import assert_gradients_close, decisive_tiny_sam_config

BF16_NATIVE = resolve_autocast_dtype("auto", "cpu") is not None

def disc_batch(size: int = 256, n: int = 3, seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for _ in range(batch):
        labels = np.zeros((size, size), np.int64)
        for i in range(n):
            cy, cx = rng.integers(30, size - 30, 2)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 20**2] = i + 1
        image = ((labels > 0) * 180 + rng.integers(0, 40, (size, size))).astype(np.uint8)
        rows.append({"image": image[..., None], "labels": labels})
    return SamInteractiveCollator(image_size=size)(rows)


def tiny_model(method: str = "lora", decisive: bool = False):
    from transformers import SamModel

    from hf_sam_peft.modeling.sam import tiny_sam_config

    torch.manual_seed(0)
    config = decisive_tiny_sam_config() if decisive else tiny_sam_config()
    return apply_method(SamModel(config), method).train()


def loss_and_grads(model, options, batch, step: int = 0, cache=None):
    loss, parts = interactive_loss(
        model, batch, training_prompt_mode(step), n_objects=3, n_rounds=4, mask_prob=0.5,
        generator=prompt_generator(0, 0, step), options=options, embedding_cache=cache,
    )
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), parts, grads


def compare(method: str, options: EfficiencyOptions, rtol: float, corrections, steps=(0, 1)) -> None:
    """The option's step vs the plain step on a tiny SAM with decisive masks, given the same correction prompts
    (``corrections.py``: otherwise float32 rounding picks the multimask min and moves sampled points)."""
    plain_model = tiny_model(method, decisive=True)
    model = prepare_model(copy.deepcopy(plain_model), options)
    batch = disc_batch()
    for step in steps:  # point mode (multimask) and box mode
        with corrections.record():
            ref_loss, ref_parts, ref_grads = loss_and_grads(plain_model, EfficiencyOptions.plain(), batch, step)
        with corrections.replay():
            loss, parts, grads = loss_and_grads(model, options, batch, step)
        assert ref_grads and set(grads) == set(ref_grads)
        assert torch.allclose(loss, ref_loss, rtol=rtol, atol=rtol), (step, loss, ref_loss)
        assert torch.allclose(parts["round_dice_loss"], ref_parts["round_dice_loss"], rtol=rtol, atol=rtol)
        assert_gradients_close(grads, ref_grads, rtol)


FLOAT32_OPTIONS = {
    "checkpoint_encoder": ("lora", EfficiencyOptions.plain(checkpoint_encoder=True)),
    "checkpoint_rounds": ("lora", EfficiencyOptions.plain(checkpoint_rounds=True)),
    "eager_attention": ("lora", EfficiencyOptions.plain(encoder_attention="eager")),
    "fused_attention": ("full_ft", EfficiencyOptions.plain(encoder_attention="fused")),
    "decoder_eager_attention": ("full_ft", EfficiencyOptions.plain(decoder_attention="eager")),
    "backward_per_round": ("lora", EfficiencyOptions.plain(backward_per_round=True)),
    "backward_per_round_full_ft": ("full_ft", EfficiencyOptions.plain(backward_per_round=True)),
    "backward_per_round_frozen": ("freeze_encoder", EfficiencyOptions.plain(backward_per_round=True)),
    "sdpa_attention": ("full_ft", EfficiencyOptions.plain(encoder_attention="sdpa")),
    # the tiny encoder's 16 x 16 global grid in four 8 x 8 key tiles
    "encoder_key_tile": ("full_ft", EfficiencyOptions.plain(encoder_attention="fused", encoder_key_tile=8)),
    "frozen_encoder_no_grad": ("freeze_encoder", EfficiencyOptions.plain(frozen_encoder_no_grad=True)),
    "cache_embeddings": ("freeze_encoder", EfficiencyOptions.plain(frozen_encoder_no_grad=True, cache_embeddings=True)),
    "fuse_decoder_projections": ("full_ft", EfficiencyOptions.plain(fuse_decoder_projections=True)),
    # the position shifts shared by all rounds as leaves differentiated per round (speed.rounds.BackwardPerRound)
    "fuse_decoder_projections_per_round": (
        "full_ft", EfficiencyOptions.plain(fuse_decoder_projections=True, backward_per_round=True)
    ),
    "contiguous_layout": ("full_ft", EfficiencyOptions.plain(contiguous_layout=True)),
    "encoder_mlp_recompute_hidden": ("full_ft", EfficiencyOptions.plain(encoder_mlp_recompute="hidden")),
    "encoder_mlp_recompute_activation": ("full_ft", EfficiencyOptions.plain(encoder_mlp_recompute="activation")),
    "retain_freed_memory": ("lora", EfficiencyOptions.plain(retain_freed_memory=True)),
    "flush_denormals": ("lora", EfficiencyOptions.plain(flush_denormals=True)),
    "all_but_autocast": ("lora", EfficiencyOptions(autocast_dtype=None)),
}


@pytest.mark.parametrize("name", sorted(FLOAT32_OPTIONS))
def test_float32_option_matches_plain_path(name, corrections):
    method, options = FLOAT32_OPTIONS[name]
    compare(method, options, rtol=1e-4, corrections=corrections)


@pytest.mark.parametrize("method", ["lora", "freeze_encoder"])
def test_bf16_autocast_is_close_to_plain_path(method):
    plain_model = tiny_model(method)
    model = prepare_model(copy.deepcopy(plain_model), EfficiencyOptions(autocast_dtype="bfloat16"))
    batch = disc_batch()
    ref_loss, _, ref_grads = loss_and_grads(plain_model, EfficiencyOptions.plain(), batch, 1)
    loss, _, grads = loss_and_grads(model, EfficiencyOptions(autocast_dtype="bfloat16"), batch, 1)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(ref_loss)) < 0.02 * float(ref_loss)
    flat = torch.cat([grads[n].flatten().float() for n in ref_grads])
    ref = torch.cat([ref_grads[n].flatten() for n in ref_grads])
    assert torch.nn.functional.cosine_similarity(flat, ref, dim=0) > 0.98


def test_same_seed_same_loss_curve_for_50_steps():
    """Plain path vs the default options: the same seed gives the same first 50 losses within bf16 noise.

    At this learning rate the tiny model's trajectory is chaotic: bf16 rounding moves single curves by up to
    ~0.03 either way (measured over init seeds: no sign bias), so the bound is on the mean over three seeds.
    """
    batch = disc_batch(size=128, n=2, batch=1)

    def curve(options, init):
        from transformers import SamModel

        from hf_sam_peft.modeling.sam import tiny_sam_config

        torch.manual_seed(init)
        model = prepare_model(apply_method(SamModel(tiny_sam_config(image_size=128)), "lora").train(), options)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for step in range(50):
            loss, _ = interactive_loss(model, batch, training_prompt_mode(step), n_objects=2, n_rounds=2,
                                       generator=prompt_generator(0, 0, step), options=options)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        return np.array(losses)

    gaps = []
    for init in range(3):
        plain, fast = curve(EfficiencyOptions.plain(), init), curve(EfficiencyOptions(), init)
        assert plain[-10:].mean() < plain[:10].mean()  # the curve moves: the comparison is not trivial
        gaps.append(np.abs(plain - fast))
    assert np.mean([g.mean() for g in gaps]) < 0.02 and max(g.max() for g in gaps) < 0.1, [g.mean() for g in gaps]


def test_frozen_encoder_builds_no_graph_and_cache_reuses_embeddings():
    model = tiny_model("freeze_encoder")
    batch = disc_batch()
    cache = EmbeddingCache(max_items=3)
    options = EfficiencyOptions.plain(frozen_encoder_no_grad=True, cache_embeddings=True)
    first = encoder_embeddings(model, batch["pixel_values"], options, cache)
    assert first.grad_fn is None and len(cache) == 2 and cache.misses == 2
    again = encoder_embeddings(model, batch["pixel_values"], options, cache)
    assert cache.hits == 2 and torch.equal(first, again)
    shifted = encoder_embeddings(model, batch["pixel_values"][:1] + 1.0, options, cache)
    assert cache.misses == 3 and not torch.equal(shifted[0], first[0])
    encoder_embeddings(model, batch["pixel_values"] - 1.0, options, cache)
    assert len(cache) == 3  # LRU bound
    lora = tiny_model("lora")  # a trainable encoder is never cached and keeps its graph
    emb = encoder_embeddings(lora, batch["pixel_values"], options, cache)
    assert emb.grad_fn is not None and len(cache) == 3


def test_prepare_model_and_attention_switch():
    model = tiny_model("lora")
    sam = unwrap_sam(model)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        sdpa = sam.vision_encoder(x).last_hidden_state
        assert set_encoder_attention(sam, "eager") == len(sam.vision_encoder.layers)
        eager = sam.vision_encoder(x).last_hidden_state
    assert torch.allclose(sdpa, eager, atol=1e-5)
    prepare_model(model, EfficiencyOptions(checkpoint_encoder=False))
    assert not sam.vision_encoder.gradient_checkpointing
    prepare_model(model, EfficiencyOptions())  # "auto": on where the CPU has no native bf16
    assert sam.vision_encoder.gradient_checkpointing == (native_autocast_dtype("cpu") is None)
    assert {layer.attn.key_tile for layer in sam.vision_encoder.layers} == {EfficiencyOptions().encoder_key_tile}
    prepare_model(model, EfficiencyOptions(encoder_key_tile=None))
    assert {layer.attn.key_tile for layer in sam.vision_encoder.layers} == {None}
    prepare_model(model, EfficiencyOptions(checkpoint_encoder=True))
    assert sam.vision_encoder.gradient_checkpointing
    frozen = prepare_model(tiny_model("freeze_encoder"), EfficiencyOptions(checkpoint_encoder=True))
    assert not unwrap_sam(frozen).vision_encoder.gradient_checkpointing  # nothing to recompute for
    with autocast_context(EfficiencyOptions(autocast_dtype="bf16"), "cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast_context(EfficiencyOptions.plain(), "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_adapters_in_the_last_block_only_train_there_and_backward_stops_early():
    from transformers import SamModel

    from hf_sam_peft.modeling.sam import tiny_sam_config

    config = tiny_sam_config()
    n_layers = config.vision_config.num_hidden_layers
    model = apply_method(SamModel(config), "lora", layers=[-1]).train()
    adapted = {n.split("layers.")[1].split(".")[0] for n, p in model.named_parameters() if "lora_" in n}
    assert adapted == {str(n_layers - 1)}
    loss, _, grads = loss_and_grads(model, EfficiencyOptions.plain(), disc_batch())
    assert any("lora_" in n for n in grads) and torch.isfinite(loss)
    assert not any("vision_encoder.layers.0." in n for n in grads)


def test_backward_per_round_leaves_gradients_to_the_loops_backward():
    """Nothing lands in ``.grad`` before ``loss.backward()``; the loop's loss scaling reaches every gradient."""
    model = tiny_model("lora")
    batch = disc_batch()
    options = EfficiencyOptions.plain(backward_per_round=True)
    loss, parts = interactive_loss(model, batch, training_prompt_mode(0), n_objects=3, n_rounds=4, mask_prob=0.5,
                                   generator=prompt_generator(0, 0, 0), options=options)
    assert all(p.grad is None for p in model.parameters())
    assert torch.allclose(loss.detach(), parts["dice_loss"] + parts["iou_mse"], atol=1e-6)
    (loss * 0.5).backward()  # e.g. gradient accumulation over two micro-batches
    half = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora_" in n for n in half) and any("mask_decoder" in n for n in half)
    model.zero_grad(set_to_none=True)
    _, _, full = loss_and_grads(model, options, batch, 0)
    for name, grad in half.items():
        assert torch.allclose(2 * grad, full[name], atol=1e-7, rtol=1e-5), name
    with torch.no_grad():  # evaluation: no gradients, the plain loss
        value, _ = interactive_loss(model, batch, training_prompt_mode(0), n_objects=3, n_rounds=4, mask_prob=0.5,
                                    generator=prompt_generator(0, 0, 0), options=options)
    assert value.grad_fn is None and torch.allclose(value, loss.detach(), atol=1e-6)


def test_decoder_attention_auto_is_eager_on_cpu_only():
    from hf_sam_peft.speed import set_decoder_attention

    sam = unwrap_sam(tiny_model("lora"))
    set_decoder_attention(sam, "auto", device="cuda")
    assert sam.mask_decoder.config._attn_implementation == "sdpa"  # left as built
    set_decoder_attention(sam, "auto")
    assert sam.mask_decoder.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="kind"):
        set_decoder_attention(sam, "flash")


def test_prepare_model_applies_and_reverts_the_decoder_options():
    from transformers.models.sam.modeling_sam import SamTwoWayTransformer

    from hf_sam_peft.modeling.mask_decoder import SamFusedTwoWayTransformer

    model = prepare_model(tiny_model("lora"), EfficiencyOptions())
    sam = unwrap_sam(model)
    assert type(sam.mask_decoder.transformer) is SamFusedTwoWayTransformer
    assert len(sam.mask_decoder.upscale_conv2._forward_hooks) == 1 and sam.vision_encoder.patch_embed._forward_hooks
    prepare_model(model, EfficiencyOptions.plain())
    assert type(sam.mask_decoder.transformer) is SamTwoWayTransformer
    assert not sam.mask_decoder.upscale_conv2._forward_hooks


def test_option_validation():
    with pytest.raises(ValueError, match="autocast_dtype"):
        EfficiencyOptions(autocast_dtype="int8")
    with pytest.raises(ValueError, match="encoder_attention"):
        EfficiencyOptions(encoder_attention="flash")
    with pytest.raises(ValueError, match="decoder_attention"):
        EfficiencyOptions(decoder_attention="fused")
    with pytest.raises(TypeError, match="checkpoint_rounds"):
        EfficiencyOptions(checkpoint_rounds="yes")
    with pytest.raises(ValueError, match="checkpoint_encoder"):
        EfficiencyOptions(checkpoint_encoder="yes")
    for tile in (0, 2.5, True):
        with pytest.raises(ValueError, match="encoder_key_tile"):
            EfficiencyOptions(encoder_key_tile=tile)
    with pytest.raises(ValueError, match="max_items"):
        EmbeddingCache(max_items=0)
    assert resolve_autocast_dtype(None, "cpu") is None
    assert resolve_autocast_dtype("fp16", "cpu") == torch.float16
    assert resolve_autocast_dtype("auto", "cpu") == (torch.bfloat16 if BF16_NATIVE else None)


def test_trainer_arguments_carry_the_options(tmp_path):
    from hf_sam_peft.training.trainer import (
        InteractiveTrainingArguments,
        SamInteractiveTrainer,
    )

    args = InteractiveTrainingArguments(output_dir=str(tmp_path), checkpoint_encoder=True, cache_embeddings=True,
                                        fuse_decoder_projections=False, use_cpu=True, report_to=[], eval_strategy="no", save_strategy="no",
                                        load_best_model_at_end=False, lr_scheduler_type="constant",
                                        lr_scheduler_kwargs={})
    assert args.efficiency_options() == EfficiencyOptions(checkpoint_encoder=True, cache_embeddings=True,
                                                          fuse_decoder_projections=False)
    with pytest.raises(ValueError, match="encoder_attention"):
        InteractiveTrainingArguments(output_dir=str(tmp_path), encoder_attention="flash", report_to=[])
    trainer = SamInteractiveTrainer(tiny_model("lora"), args)
    assert unwrap_sam(trainer.model).vision_encoder.gradient_checkpointing
    assert trainer.embedding_cache is not None


def test_checkpoint_encoder_auto_follows_native_bf16(monkeypatch, tmp_path):
    """"auto" checkpoints the trainable encoder exactly where a CPU step's activations must stay float32."""
    import hf_sam_peft.speed.resolve as resolve
    from hf_sam_peft.training.trainer import InteractiveTrainingArguments

    for native, expected in ((torch.bfloat16, False), (None, True)):
        monkeypatch.setattr(resolve, "native_autocast_dtype", lambda device, native=native: native)
        assert resolve_checkpoint_encoder("auto", "cpu") is expected
        sam = unwrap_sam(prepare_model(tiny_model("lora"), EfficiencyOptions()))
        assert sam.vision_encoder.gradient_checkpointing is expected
        frozen = unwrap_sam(prepare_model(tiny_model("freeze_encoder"), EfficiencyOptions()))
        assert not frozen.vision_encoder.gradient_checkpointing  # nothing trains there
    assert resolve_checkpoint_encoder("auto", "meta") is False  # only CPUs
    assert resolve_checkpoint_encoder(True, "cpu") is True and resolve_checkpoint_encoder(False, "cpu") is False
    # the trainer's command-line strings
    for text, option in (("auto", "auto"), ("True", True), ("false", False)):
        args = InteractiveTrainingArguments(output_dir=str(tmp_path), checkpoint_encoder=text, report_to=[])
        assert args.efficiency_options().checkpoint_encoder == option
    with pytest.raises(ValueError, match="checkpoint_encoder"):
        InteractiveTrainingArguments(output_dir=str(tmp_path), checkpoint_encoder="sometimes", report_to=[])


def test_encoder_mlp_recompute_auto_is_on_for_float32_cpu_steps_without_checkpointing(monkeypatch, tmp_path):
    import hf_sam_peft.speed.resolve as resolve
    from hf_sam_peft.modeling.mlp import SamRecomputedMLPBlock
    from hf_sam_peft.training.trainer import InteractiveTrainingArguments

    # (native bf16, bf16 faster than float32) -> "auto": AMX, AVX512-BF16 without AMX, AVX2
    for native, fast, expected in ((torch.bfloat16, torch.bfloat16, None), (torch.bfloat16, None, "hidden"), (None, None, None)):
        monkeypatch.setattr(resolve, "native_autocast_dtype", lambda device, native=native: native)
        monkeypatch.setattr(resolve, "fast_autocast_dtype", lambda device, fast=fast: fast)
        assert resolve_mlp_recompute(EfficiencyOptions(), "cpu") == expected
        sam = unwrap_sam(prepare_model(tiny_model("lora"), EfficiencyOptions()))
        recomputed = [type(layer.mlp) is SamRecomputedMLPBlock for layer in sam.vision_encoder.layers]
        assert all(recomputed) if expected else not any(recomputed)
    # explicit float32 where bf16 would be chosen; an explicit choice; not on other devices
    monkeypatch.setattr(resolve, "native_autocast_dtype", lambda device: torch.bfloat16)
    assert resolve_mlp_recompute(EfficiencyOptions(autocast_dtype=None), "cpu") == "hidden"
    assert resolve_mlp_recompute(EfficiencyOptions(autocast_dtype=None, checkpoint_encoder=True), "cpu") is None
    assert resolve_mlp_recompute(EfficiencyOptions(encoder_mlp_recompute="activation"), "cpu") == "activation"
    assert resolve_mlp_recompute(EfficiencyOptions(autocast_dtype=None), "meta") is None
    with pytest.raises(ValueError, match="encoder_mlp_recompute"):
        EfficiencyOptions(encoder_mlp_recompute="always")
    # the trainer's command-line strings: "none" is None
    for text, option in (("none", None), ("hidden", "hidden"), ("auto", "auto")):
        args = InteractiveTrainingArguments(output_dir=str(tmp_path), encoder_mlp_recompute=text, report_to=[])
        assert args.efficiency_options().encoder_mlp_recompute == option


def test_encoder_key_tile_from_the_command_line(tmp_path):
    """HfArgumentParser parses ``int | None`` as an int: 0 is how the command line turns the key tiles off."""
    from transformers import HfArgumentParser

    from hf_sam_peft.training.trainer import InteractiveTrainingArguments

    parser = HfArgumentParser(InteractiveTrainingArguments)
    for text, tile in (("0", None), ("16", 16)):
        (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--encoder_key_tile", text,
                                                      "--report_to", "none"])
        assert args.efficiency_options().encoder_key_tile == tile
    with pytest.raises(ValueError, match="encoder_key_tile"):
        InteractiveTrainingArguments(output_dir=str(tmp_path), encoder_key_tile=-1, report_to=[])
