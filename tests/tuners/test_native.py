"""peft's own methods (DoRA, VeRA, IA3, OFT, BOFT, LoHa, LoKr, AdaLoRA, HRA, FourierFT) by name on SAM's encoder.

Each on a tiny SamModel: where it sits (encoder blocks only, never the mask decoder's two-way transformer,
whose blocks also have `layers.<i>.mlp.lin1`), one interactive training step on real nuclei, peft's save and
load into a fresh base with the same outputs, and peft's merge. Also: the q/v limit as a one-line error,
placement on the last blocks for every method, AdaLoRA's schedule run by the trainer, and peft's LN tuning
against our `ln_tune`.
"""

from __future__ import annotations

import pytest
import torch
from peft import LNTuningConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import SamModel

from hf_sam_peft.methods import ALL_METHOD_NAMES, METHOD_NAMES, PEFT_METHOD_NAMES, apply_method, count_parameters
from hf_sam_peft.modeling.sam import tiny_sam_config
from hf_sam_peft.sam_forward import prompt_generator
from hf_sam_peft.training.collate import SamInteractiveCollator
from hf_sam_peft.training.interactive import BOX_MODE, interactive_loss
from hf_sam_peft.tuners.base import BLOCK_NORMS, default_modules_to_save, encoder_regex
from tests.conftest import shared_dataset
from tests.tuners.helpers import outputs

DSB = "dsb2018_stage1test_fluo_nuclei"
PEFT_TYPES = {
    "dora": "LORA", "vera": "VERA", "ia3": "IA3", "oft": "OFT", "boft": "BOFT", "loha": "LOHA", "lokr": "LOKR",
    "adalora": "ADALORA", "hra": "HRA", "fourierft": "FOURIERFT",
}
# FourierFT's default 1000 frequencies exceed a tiny model's 64x64 attention projections; SAM's are 768 wide
TINY_OPTIONS = {"fourierft": dict(n_frequency=64)}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Real 128x128 nuclei patches with at least 4 objects each."""
    from hf_sam_peft.data import build_dataset

    return build_dataset(
        shared_dataset(DSB), "train", n_patches_per_image=1, patch_shape=(128, 128), min_objects=4,
        cache_dir=tmp_path_factory.mktemp("hf_cache"),
    ).select([0, 1])


@pytest.fixture(scope="module")
def batch(rows):
    """Two of them, collated for the tiny SAM's 256 px input."""
    return SamInteractiveCollator(256)([rows[0], rows[1]])


def tiny_base() -> SamModel:
    torch.manual_seed(0)
    return SamModel(tiny_sam_config()).eval()


def adapted(name: str, **options) -> PeftModel:
    torch.manual_seed(1)
    return apply_method(tiny_base(), name, **{**TINY_OPTIONS.get(name, {}), **options})


def wrapped_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def train_one_step(model, batch, lr: float = 1e-2) -> None:
    """One interactive step (box start, a correction), each tensor moved by ``lr`` along its normalised
    gradient (a random tiny SAM's encoder gradients are ~1e-8: plain SGD would not move a weight of 1)."""
    model.train()
    loss, _ = interactive_loss(model, batch, BOX_MODE, n_objects=3, n_rounds=2, mask_prob=0.5,
                               generator=prompt_generator(0, 0, 0))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad / p.grad.abs().max().clamp(min=1e-30))
                p.grad = None
    model.eval()


def test_the_method_lists():
    assert len(METHOD_NAMES) == 10 and len(PEFT_METHOD_NAMES) == 10
    assert ALL_METHOD_NAMES == METHOD_NAMES + PEFT_METHOD_NAMES


@pytest.mark.parametrize("name", [n for n in PEFT_METHOD_NAMES if n != "oft"])
def test_peft_method_trains_saves_reloads_and_merges(batch, name, tmp_path):
    model = adapted(name)
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type.name == PEFT_TYPES[name]
    layers = wrapped_layers(model)
    assert layers and all(".vision_encoder.layers." in layer for layer in layers), layers
    assert {layer.rsplit(".", 1)[-1] for layer in layers} <= {"qkv", "lin1", "lin2"}
    assert any(layer.endswith("attn.qkv") for layer in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("mask_decoder" in n for n in trainable) and any("prompt_encoder" in n for n in trainable)
    assert not any("vision_encoder" in n and "base_layer" in n for n in trainable)  # SAM's own weights frozen

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_one_step(model, batch)
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("vision_encoder" in n for n in moved), f"no encoder adapter weight of {name} moved"
    expected = outputs(model)

    model.save_pretrained(tmp_path / name)
    reloaded = PeftModel.from_pretrained(tiny_base(), str(tmp_path / name)).eval()
    for got, want, what in zip(outputs(reloaded), expected, ("embedding", "masks", "iou")):
        assert torch.allclose(got, want, atol=1e-5), f"{name}: reloaded {what} differ by {(got - want).abs().max():.2e}"

    merged = reloaded.merge_and_unload()
    assert isinstance(merged, SamModel) and not wrapped_layers(merged)
    for got, want, what in zip(outputs(merged), expected, ("embedding", "masks", "iou")):
        # merging reorders float sums: compared against the output's own scale
        scale = want.abs().max().clamp(min=1.0)
        assert (got - want).abs().max() <= 1e-4 * scale, f"{name}: merged {what} differ by {(got - want).abs().max():.2e}"


@pytest.mark.parametrize("name", ["dora", "loha", "boft"])
def test_q_and_v_alone_is_a_one_line_error_naming_the_alternative(name):
    for options in (dict(target="qv"), dict(target_modules=["q_proj", "v_proj"])):
        with pytest.raises(ValueError, match=r"cannot adapt q and v alone: use target='qkv'.*method 'lora'") as err:
            apply_method(tiny_base(), name, **options)
        assert "\n" not in str(err.value)


def test_target_picks_attention_or_mlp():
    assert {n.rsplit(".", 1)[-1] for n in wrapped_layers(adapted("loha", target="qkv"))} == {"qkv"}
    assert {n.rsplit(".", 1)[-1] for n in wrapped_layers(adapted("loha", target="mlp"))} == {"lin1", "lin2"}
    with pytest.raises(ValueError, match="target must be one of qkv_mlp, qkv, mlp"):
        adapted("loha", target="attention")


def test_an_option_that_does_not_fit_the_layers_names_the_method():
    with pytest.raises(ValueError, match=r"^method 'fourierft': .*n_frequency"):
        apply_method(tiny_base(), "fourierft", n_frequency=10**6)


@pytest.mark.parametrize("name", [n for n in ALL_METHOD_NAMES if n not in ("freeze_encoder", "qlora", "oft")])
def test_every_method_can_be_placed_on_the_last_block(name):
    """`layers=[-1]`: the last of the tiny encoder's two blocks adapted, the first frozen whole."""
    model = adapted(name, layers=[-1])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "vision_encoder" in n]
    assert trainable, name
    assert all("vision_encoder.layers.1." in n for n in trainable), [n for n in trainable if ".layers.1." not in n]


def test_ia3_scales_the_mlp_input_of_its_second_linear():
    model = adapted("ia3")
    config = model.peft_config["default"]
    lin2 = model.get_base_model().vision_encoder.layers[0].mlp.lin2
    lin1 = model.get_base_model().vision_encoder.layers[0].mlp.lin1
    assert lin2.is_feedforward and not lin1.is_feedforward
    assert lin2.ia3_l["default"].shape == (1, lin2.in_features) and config.feedforward_modules


def test_adalora_rank_schedule_runs_in_the_trainer(rows, tmp_path, monkeypatch):
    from peft.tuners.adalora import AdaLoraModel

    from hf_sam_peft.training.trainer import InteractiveTrainingArguments, SamInteractiveTrainer

    steps: list[int] = []
    original = AdaLoraModel.update_and_allocate
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", lambda self, step: steps.append(step) or original(self, step))
    model = adapted("adalora", tinit=0, tfinal=1, deltaT=1)
    args = InteractiveTrainingArguments(
        output_dir=str(tmp_path), max_steps=3, n_objects=3, n_sub_iterations=2, learning_rate=1e-3, seed=0,
        logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none", eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, plot_loss_curve=False, lr_scheduler_type="constant", lr_scheduler_kwargs={},
    )
    trainer = SamInteractiveTrainer(model, args, train_dataset=rows)
    trainer.train()
    assert steps == [0, 1, 2]
    assert model.peft_config["default"].total_step == 3  # set from the run's max_steps
    assert all("orth_reg" in entry for entry in trainer.state.log_history if "loss" in entry)


def test_peft_ln_tuning_trains_what_ln_tune_trains(batch):
    """peft's LN tuning on the same norms: the same trainable count and, after the same step, the same model
    (so there is one method, ``ln_tune``, which trains the norms in place instead of a copy of each)."""
    ours = apply_method(tiny_base(), "ln_tune")
    theirs = get_peft_model(
        tiny_base(), LNTuningConfig(target_modules=encoder_regex(*BLOCK_NORMS), modules_to_save=default_modules_to_save())
    )
    assert count_parameters(ours)[0] == count_parameters(theirs)[0]
    for model in (ours, theirs):
        train_one_step(model, batch)
    for got, want in zip(outputs(theirs), outputs(ours)):
        assert torch.allclose(got, want, atol=1e-5)


def test_full_ft_on_the_last_block_only():
    model = apply_method(tiny_base(), "full_ft", layers=-1)
    encoder = {n: p.requires_grad for n, p in model.vision_encoder.named_parameters()}
    assert all(flag == n.startswith("layers.1.") for n, flag in encoder.items())
    assert all(p.requires_grad for p in model.mask_decoder.parameters())
    with pytest.raises(ValueError, match="only the option 'layers'"):
        apply_method(tiny_base(), "full_ft", r=4)


def test_oft_where_peft_can_run_it():
    """peft's OFT unfolds any 4-D input as a convolution's: SAM's ViT gives its Linears (B, H, W, C), so OFT
    there is a one-line error naming the alternatives; LiteMedSAM's TinyViT gives (B, N, C), and OFT trains."""
    from hf_sam_peft.modeling.lite_medsam import LiteSamModel, tiny_lite_sam_config

    with pytest.raises(ValueError, match=r"^method 'oft': .*use 'boft'") as err:
        apply_method(tiny_base(), "oft")
    assert "\n" not in str(err.value)
    torch.manual_seed(0)
    config = tiny_lite_sam_config()
    model = apply_method(LiteSamModel(config), "oft", oft_block_size=8)
    size = config.vision_config.image_size
    embedding = model.get_base_model().vision_encoder(torch.randn(1, 3, size, size)).last_hidden_state
    embedding.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "oft_R" in n]
    assert grads and all(g is not None for g in grads)
