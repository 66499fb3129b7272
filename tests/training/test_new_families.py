"""SAM-HQ (`SamHQModel`) and the SAM 3 tracker (`Sam3TrackerModel`) through the same pipeline as SAM and SAM 2:
every method that fits applied to a tiny model, one step of µSAM's interactive objective, save, reload into a
fresh base with the same outputs, and merge where the method is mergeable.

Tiny random models (`load_base_model("tiny_sam_hq" | "tiny_sam3_tracker")`) on synthetic images; no weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

import hf_sam_peft
from hf_sam_peft.modeling.base_models import load_base_model
from hf_sam_peft.sam_forward import Prompts, decode, encode_images, prompt_generator
from hf_sam_peft.sam_forward.kinds import frame_of, main_embedding, model_kind
from hf_sam_peft.sam_forward.preprocess import image_preprocessor, preprocess_image, sam3_preprocess
from hf_sam_peft.training.collate import SamInteractiveCollator
from hf_sam_peft.training.interactive import BOX_MODE, POINT_MODE, interactive_loss

FAMILIES = ("sam_hq", "sam3_tracker")
METHODS = ("freeze_encoder", "ln_tune", "bias_tune", "attn_tune", "lora", "adaptformer", "ssf", "fact")
MERGEABLE = ("ln_tune", "bias_tune", "attn_tune", "lora", "ssf", "fact")
# what each method wraps in SAM 3's ViT blocks (its q, k, v and output projections are separate Linears)
SAM3_WRAPPED = {
    "ln_tune": {"layer_norm1", "layer_norm2"},
    "bias_tune": {"layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", *(f"attention.{p}_proj" for p in "qkvo")},
    "attn_tune": {"attention"},
    "lora": {"attention.q_proj", "attention.v_proj"},
    "adaptformer": {"mlp"},
    "fact": {"attention.q_proj", "attention.v_proj"},
}
SAM3_WRAPPED["ssf"] = SAM3_WRAPPED["bias_tune"]


@pytest.fixture(scope="module", params=FAMILIES)
def base(request):
    model = load_base_model(f"tiny_{request.param}")[0]
    if hasattr(model, "no_memory_embedding"):  # zero-initialised in transformers; non-zero in real checkpoints
        with torch.no_grad():
            model.no_memory_embedding.normal_(std=0.1)
    return model


def rows(n: int = 2, seed: int = 0) -> list[dict]:
    """Synthetic 96x128 images with three rectangular objects each."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = np.zeros((96, 128), dtype=np.int64)
        for k, (y, x) in enumerate(g.integers(5, 60, size=(3, 2)), start=1):
            labels[y : y + 25, x : x + 35] = k
        image = (g.random((96, 128, 3)) * 80 + 40 * (labels > 0)[..., None]).astype(np.uint8)
        out.append({"image": image, "labels": labels})
    return out


def prompts(size: int) -> Prompts:
    points = torch.tensor([[[[0.3 * size, 0.4 * size], [0.7 * size, 0.2 * size]]]])
    return Prompts(points, torch.tensor([[[1, 0]]]), torch.tensor([[[0.1 * size, 0.2 * size, 0.6 * size, 0.7 * size]]]))


@torch.no_grad()
def outputs(model) -> list[torch.Tensor]:
    """Every embedding level, low-res masks and IoU through the pipeline's own encode / decode."""
    sam = model.get_base_model() if hasattr(model, "get_base_model") else model
    size = sam.config.prompt_encoder_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    embeddings = encode_images(model, pixels)
    low, iou = decode(model, embeddings, prompts(size), multimask=False)
    return [*embeddings, low, iou]


def assert_close(a, b, atol: float = 0.0) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.allclose(x, y, atol=atol, rtol=0), f"output {i} differs by {(x - y).abs().max():.2e}"


def backward_interactive(model, modes) -> torch.optim.Optimizer:
    """The interactive objective's losses on :func:`rows`, one per mode, backpropagated in training mode; returns
    the SGD optimizer over the trainable parameters for the caller's step (after it has looked at the gradients)."""
    batch = SamInteractiveCollator.from_model(model)(rows())
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for i, mode in enumerate(modes):
        loss, _ = interactive_loss(model, batch, mode, n_objects=2, n_rounds=2, mask_prob=1.0,
                                   generator=prompt_generator(0, 0, i))
        loss.backward()
    return optimizer


def assert_trained_and_reloaded(model, base, folder) -> list[torch.Tensor]:
    """``model`` (stepped) differs from ``base``, and its saved adapter loaded into a fresh ``base`` gives the same
    outputs; returns those outputs."""
    model.eval()
    expected = outputs(model)
    assert not torch.allclose(expected[-2], outputs(base)[-2], atol=1e-5)  # trained: not the base model
    model.save_pretrained(folder)
    reloaded = hf_sam_peft.load_adapter(copy.deepcopy(base), str(folder)).eval()
    assert_close(outputs(reloaded), expected)
    return expected


def test_kinds_frames_and_embeddings_match_transformers(base):
    kind = model_kind(base)
    size = base.config.prompt_encoder_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ours = encode_images(base, pixels)
    theirs = base.get_image_embeddings(pixels)  # SAM-HQ: (embedding, intermediate list); SAM 3: three maps
    if kind == "sam_hq":
        assert frame_of(base) == "pad" and image_preprocessor(base) is preprocess_image
        close = lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=0)  # (with and without a graph)
        assert close(ours[0], theirs[1][0]) and close(main_embedding(ours), theirs[0])
    else:
        assert frame_of(base) == "square" and image_preprocessor(base) is sam3_preprocess
        assert len(ours) == 3 and all(torch.allclose(o, t, atol=1e-5) for o, t in zip(ours, theirs))
    # decode through the model's own forward equals transformers' full forward on the pixels (multimask: the SAM 3
    # decoder's eval-mode single-mask choice is not ours, see sam_forward.forward)
    p = prompts(size)
    low, iou = decode(base, [t[:1] for t in ours], p, multimask=True)
    full = base(pixel_values=pixels[:1], input_points=p.points, input_labels=p.labels, input_boxes=p.boxes,
                multimask_output=True)
    scale = float(full.pred_masks.abs().max())
    assert torch.allclose(low[0], full.pred_masks[0], atol=1e-4 * scale) and torch.allclose(iou[0], full.iou_scores[0], atol=1e-5)


def test_sam3_preprocess_uses_sam3_statistics():
    image = np.full((10, 20, 3), 255, dtype=np.uint8)
    values, size = sam3_preprocess(image, 28)
    assert size == (28, 28) and values.shape == (3, 28, 28) and torch.allclose(values, torch.ones_like(values))


def test_sam3_four_level_neck_drops_the_detector_level():
    """The released SAM 3 neck has a fourth (stride-28) level: the tracker's three maps are the first three and
    no_memory_embedding goes to the stride-14 one (Sam3TrackerVideoModel's order, see sam_forward.forward)."""
    from transformers import Sam3TrackerModel

    from hf_sam_peft.modeling.sam3_tracker import tiny_sam3_tracker_config

    config = tiny_sam3_tracker_config()
    config.vision_config.scale_factors = [4.0, 2.0, 1.0, 0.5]
    torch.manual_seed(0)
    model = Sam3TrackerModel(config).eval()
    with torch.no_grad():
        model.no_memory_embedding.normal_()
    pixels = torch.randn(1, 3, 224, 224)
    fpn = model.vision_encoder(pixels).fpn_hidden_states
    ours = encode_images(model, pixels)
    assert len(fpn) == 4 and [tuple(t.shape[-2:]) for t in ours] == [(64, 64), (32, 32), (16, 16)]
    assert torch.allclose(ours[2], fpn[2] + model.no_memory_embedding.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_reloads_and_merges(base, method, tmp_path):
    model = hf_sam_peft.apply_method(copy.deepcopy(base), method)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "vision_encoder." in n}
    assert bool(wrapped) == (method != "freeze_encoder")
    if model_kind(base) == "sam3_tracker" and method in SAM3_WRAPPED:
        suffixes = {n.split("backbone.layers.", 1)[1].split(".", 1)[1] for n in wrapped}
        assert suffixes == SAM3_WRAPPED[method]
    assert_close(outputs(model), outputs(base), atol=1e-6)  # every method starts as the base model

    optimizer = backward_interactive(model, (POINT_MODE, BOX_MODE))  # one step: points then boxes
    encoder_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "vision_encoder." in n]
    assert bool(encoder_grads) == (method != "freeze_encoder")
    assert any(g is not None and g.abs().sum() > 0 for g in encoder_grads) or method == "freeze_encoder"
    optimizer.step()
    expected = assert_trained_and_reloaded(model, base, tmp_path)
    if method in MERGEABLE:
        merged = model.merge_and_unload()
        assert type(merged) is type(base)
        assert_close(outputs(merged), expected, atol=1e-5)


def test_full_ft_trains_every_parameter_but_the_fourier_basis(base):
    model = hf_sam_peft.apply_method(copy.deepcopy(base), "full_ft")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all("positional_embedding" in n for n in frozen)


@pytest.mark.parametrize("method", ["dora", "ia3", "loha", "boft", "hra"])
def test_peft_methods_on_the_whole_linears(base, method):
    model = hf_sam_peft.apply_method(copy.deepcopy(base), method)
    names = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, BaseTunerLayer) and "vision_encoder." in n}
    if model_kind(base) == "sam3_tracker":
        assert names == {"attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1", "mlp.fc2"}
    else:
        assert names == {"attn.qkv", "mlp.lin1", "mlp.lin2"}
    assert outputs(model)[-1].isfinite().all()


def test_oft_is_a_one_line_error_on_both(base):
    with pytest.raises(ValueError, match="use 'boft'"):
        hf_sam_peft.apply_method(copy.deepcopy(base), "oft")


def test_layers_index_the_new_encoders(base):
    model = hf_sam_peft.apply_method(copy.deepcopy(base), "lora", layers=[-1])
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "vision_encoder." in n]
    assert wrapped and all(".layers.1." in n for n in wrapped)
