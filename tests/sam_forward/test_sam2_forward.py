"""SAM 2 through the shared forward (hf_sam_peft.sam_forward): preprocessing against transformers' SAM 2
processor, encode_images against Sam2Model.get_image_embeddings (with the graph), decode against the
model's own point batch, mask inputs, the single-mask token and the kind dispatch."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch

from hf_sam_peft.sam_forward import (
    Frames,
    Prompts,
    decode,
    encode_images,
    frame_of,
    image_preprocessor,
    input_size_of,
    is_sam2,
    main_embedding,
    model_kind,
    postprocess_masks,
    sam2_preprocess,
)
from hf_sam_peft.training.collate import SamInteractiveCollator
from tests.conftest import shared_dataset

DSB = "dsb2018_stage1test_fluo_nuclei"


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.fixture
def tiny_sam2():
    from transformers import Sam2Model

    from hf_sam_peft.modeling.sam2 import tiny_sam2_config

    torch.manual_seed(0)
    model = Sam2Model(tiny_sam2_config()).eval()
    with torch.no_grad():  # zero at init: make the term visible
        model.no_memory_embedding.normal_()
    return model


@pytest.fixture(scope="module")
def sam2_image_processor_class():
    """transformers' ``Sam2ImageProcessor`` class (its settings and mask postprocessing).

    Its module imports torchvision's ``batched_nms`` at the top (only automatic mask generation uses it) and
    its image pipeline runs on torchvision, which does not import beside torch 2.13 here (DESIGN §8): a
    stand-in ``torchvision.ops.boxes`` is put in place for the import only, then removed again.
    """
    import transformers  # noqa: F401  (first, so that it never sees the stand-ins)

    added = []
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.boxes"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    if "torchvision.ops.boxes" in added:
        sys.modules["torchvision.ops.boxes"].batched_nms = lambda *args, **kwargs: None
    module_name = "transformers.models.sam2.image_processing_sam2"
    try:
        module = importlib.import_module(module_name)
    finally:
        for name in added:
            sys.modules.pop(name, None)
        sys.modules.pop(module_name, None)
    return module.Sam2ImageProcessor


def _reference_processor(cls, image_size: int):
    """``Sam2ImageProcessor``'s own settings (size, resample, rescale, ImageNet mean/std, no padding) run through
    transformers' PIL backend instead of its torchvision one (which cannot run here)."""
    from transformers.image_processing_backends import PilBackend

    keys = ("image_mean", "image_std", "resample", "rescale_factor", "do_resize", "do_rescale", "do_normalize",
            "do_convert_rgb", "do_pad")
    pil = type("Sam2ImageProcessorPil", (PilBackend,), {key: getattr(cls, key) for key in keys})
    return pil(size={"height": image_size, "width": image_size})


# ---- kinds -------------------------------------------------------------------------------------------------


def test_kind_dispatch(tiny_sam2, tiny_sam):
    assert model_kind(tiny_sam2) == "sam2" and is_sam2(tiny_sam2) and frame_of(tiny_sam2) == "square"
    assert model_kind(tiny_sam) == "sam" and frame_of(tiny_sam) == "pad"
    assert input_size_of(tiny_sam2) == 256 and input_size_of(tiny_sam) == 256
    assert image_preprocessor(tiny_sam2) is sam2_preprocess
    collator = SamInteractiveCollator.from_model(tiny_sam2)
    assert collator.image_size == 256 and collator.preprocess is sam2_preprocess


# ---- preprocessing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, image_size", [("0a849e0e", 1024), ("8b59819f", 256)])
def test_preprocessing_matches_sam2_processor(name, image_size, sam2_image_processor_class):
    """Upscaling (256² -> 1024²) and a non-square downscale (520x696 -> 256²): pixel values equal up to the
    processor's uint8 rounding of the resized image; prompts and postprocessed masks as Sam2Processor maps them."""
    from PIL import Image
    from transformers import Sam2Processor

    cls = sam2_image_processor_class
    assert cls.size == {"height": 1024, "width": 1024} and cls.do_pad is None  # the square, no padding
    path = next((shared_dataset(DSB) / "train" / "images").glob(f"{name}*.png"))
    image = np.array(Image.open(path))
    image = image[..., :3] if image.ndim == 3 else image
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, -1)
    expected = _reference_processor(cls, image_size)(images=rgb, return_tensors="pt")["pixel_values"]
    ours = SamInteractiveCollator(image_size, preprocess=sam2_preprocess)([{"image": image}])
    difference = (ours["pixel_values"] - expected).abs()
    assert difference.max().item() < 1.5 / 57.12 and difference.mean().item() < 0.005  # ~1 grey level
    height, width = image.shape[:2]
    assert ours["reshaped_input_sizes"].tolist() == [[image_size, image_size]]
    assert ours["original_sizes"].tolist() == [[height, width]]

    # prompts: Sam2Processor's coordinate normalisation (it needs no image processor for that)
    processor = Sam2Processor.__new__(Sam2Processor)
    processor.target_size, processor.point_pad_value = image_size, -10
    points = [[7.0, 11.0], [width - 1.0, height / 2]]
    box = [3.0, 5.0, width * 0.75, height - 1.0]
    reference = processor(
        original_sizes=[[height, width]], input_points=[[points]], input_labels=[[[1, 0]]],
        input_boxes=[[box]], return_tensors="pt",
    )
    frames = Frames(ours["original_sizes"], ours["reshaped_input_sizes"], image_size, "square")
    assert torch.allclose(frames.coords(0, torch.tensor([points])), reference["input_points"][0], atol=1e-4)
    assert torch.allclose(frames.boxes(0, torch.tensor([box])), reference["input_boxes"][0], atol=1e-4)

    # low-res logits back to the image: one bilinear resize (Sam2ImageProcessor.post_process_masks)
    low_res = torch.randn(1, 3, image_size // 4, image_size // 4)
    post = cls.post_process_masks(None, [low_res], [[height, width]], binarize=False)[0]
    assert torch.allclose(frames.upscale(0, low_res), post, atol=1e-5)
    direct = postprocess_masks(low_res, image_size, (image_size,) * 2, (height, width), "square")
    assert torch.allclose(direct, post, atol=1e-5)


def test_sam2_preprocess_stretches_while_sam_pads(tiny_sam2):
    image = np.zeros((100, 200), np.uint8)
    image[:, 100:] = 255
    values, size = sam2_preprocess(image, 64)
    assert size == (64, 64) and values.shape == (3, 64, 64)
    assert values[0, :, :30].max() < 0 < values[0, :, 34:].min()  # the right half is bright over the full height
    frames = Frames(torch.tensor([[100, 200]]), torch.tensor([[64, 64]]), 64, frame_of(tiny_sam2))
    assert frames.coords(0, torch.tensor([[[200.0, 100.0]]])).tolist() == [[[64.0, 64.0]]]  # per-axis scale
    with pytest.raises(ValueError, match="frame"):
        postprocess_masks(torch.zeros(1, 16, 16), 64, (64, 64), (100, 200), "stretched")


# ---- encode once, decode per prompt ------------------------------------------------------------------------


def test_encode_images_matches_get_image_embeddings_with_graph(tiny_sam2):
    pixel_values = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    expected = tiny_sam2.get_image_embeddings(pixel_values)
    embeddings = encode_images(tiny_sam2, pixel_values)
    assert [tuple(e.shape) for e in embeddings] == [(2, 4, 64, 64), (2, 8, 32, 32), (2, 32, 16, 16)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(embeddings, expected))
    assert main_embedding(embeddings) is embeddings[-1]
    sum(e.sum() for e in embeddings).backward()  # the graph reaches the encoder and the decoder-owned convs
    for parameter in (tiny_sam2.vision_encoder.backbone.patch_embed.projection.weight,
                      tiny_sam2.mask_decoder.conv_s0.weight, tiny_sam2.mask_decoder.conv_s1.weight,
                      tiny_sam2.no_memory_embedding):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_decode_matches_sam2_point_batch_and_routes_mask_inputs(tiny_sam2):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeddings = encode_images(tiny_sam2, torch.randn(2, 3, 256, 256, generator=gen))
        points = torch.randint(0, 256, (2, 3, 2, 2), generator=gen).float()
        labels = torch.tensor([1, 0]).expand(2, 3, 2)
        boxes = torch.tensor([[10.0, 20.0, 90.0, 120.0]]).expand(2, 3, 4)
        prompts = Prompts(points, labels, boxes)
        low, iou = decode(tiny_sam2, embeddings, prompts, multimask=True)
        out = tiny_sam2(image_embeddings=embeddings, input_points=points, input_labels=labels, input_boxes=boxes)
        assert low.shape == (2, 3, 3, 64, 64) and iou.shape == (2, 3, 3)
        assert close(low, out.pred_masks) and close(iou, out.iou_scores)
        masks = 20 * torch.randn(2, 3, 1, 64, 64, generator=gen)
        with_masks, _ = decode(tiny_sam2, embeddings, prompts, False, masks, torch.tensor([True, True]))
        without, _ = decode(tiny_sam2, embeddings, prompts, False)
        mixed, _ = decode(tiny_sam2, embeddings, prompts, False, masks, torch.tensor([False, True]))
        tiny_sam2.train()  # token 0, as decode returns it (see test_single_mask_is_token_zero)
        single = tiny_sam2(
            image_embeddings=[e[1:2].expand(3, -1, -1, -1) for e in embeddings], input_points=points[1][:, None],
            input_labels=labels[1][:, None], input_boxes=boxes[1][:, None], input_masks=masks[1],
            multimask_output=False,
        )
    assert (with_masks - without).abs().max() > 0.01 * without.abs().max()  # each object's mask input is used
    assert close(mixed[0], without[0]) and close(mixed[1], with_masks[1])
    assert close(with_masks[1], single.pred_masks[:, 0])


def test_single_mask_is_token_zero_unless_dynamic(tiny_sam2):
    """Eval mode: transformers' Sam2MaskDecoder swaps an unstable token-0 mask for the best multimask one
    (dynamic_multimask_via_stability); decode returns token 0 (training's output) unless asked."""
    decoder = tiny_sam2.mask_decoder
    assert decoder.dynamic_multimask_via_stability is True
    with torch.no_grad():
        embeddings = encode_images(tiny_sam2, torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)))
        prompts = Prompts(torch.tensor([[[[120.0, 130.0]]]]), torch.tensor([[[1]]]))
        kwargs = dict(image_embeddings=embeddings, input_points=prompts.points, input_labels=prompts.labels,
                      multimask_output=False)
        dynamic = tiny_sam2(**kwargs).pred_masks[:, 0]
        ours, _ = decode(tiny_sam2, embeddings, prompts, False)
        asked, _ = decode(tiny_sam2, embeddings, prompts, False, dynamic_multimask=True)
        tiny_sam2.train()
        token_zero = tiny_sam2(**kwargs).pred_masks[:, 0]
    assert decoder.dynamic_multimask_via_stability is True  # restored
    assert not torch.equal(dynamic, token_zero)  # the heuristic fired on this (unstable) random model
    assert torch.equal(ours[0], token_zero) and torch.equal(asked[0], dynamic)
