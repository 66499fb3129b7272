"""SAM's shared forward (hf_sam_peft.sam_forward): preprocessing against transformers' processor, decode against
SamModel's own point batch, the seeded prompt generator, and the old import paths that re-export them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_sam_peft.sam_forward import Prompts, decode, postprocess_masks, prompt_generator
from hf_sam_peft.training.collate import SamInteractiveCollator
from tests.conftest import shared_dataset

DSB = "dsb2018_stage1test_fluo_nuclei"


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float noise, relative to the (tiny, for random tiny SAMs) scale of ``b``."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


# ---- preprocessing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, image_size", [("0a849e0e", 1024), ("8b59819f", 256)])
def test_preprocessing_matches_sam_image_processor(name, image_size):
    """Upscaling (256² -> 1024) and downscaling (520x696 -> 256): equal up to the processor's uint8 rounding."""
    from PIL import Image
    from transformers import SamImageProcessorPil

    path = next((shared_dataset(DSB) / "train" / "images").glob(f"{name}*.png"))
    image = np.array(Image.open(path))
    size = {"longest_edge": image_size}
    reference = SamImageProcessorPil(size=size, pad_size={"height": image_size, "width": image_size})
    expected = reference(images=np.repeat(image[..., None], 3, -1), return_tensors="pt")
    ours = SamInteractiveCollator(image_size)([{"image": image}])
    difference = (ours["pixel_values"] - expected["pixel_values"]).abs()
    assert difference.max().item() < 1.5 / 57.12 and difference.mean().item() < 0.005  # ~1 grey level
    assert torch.equal(ours["reshaped_input_sizes"], expected["reshaped_input_sizes"])
    assert torch.equal(ours["original_sizes"], expected["original_sizes"])
    low_res = torch.randn(1, 1, 3, 256, 256)
    post = reference.post_process_masks(
        low_res, expected["original_sizes"], expected["reshaped_input_sizes"], binarize=False,
        pad_size={"height": image_size, "width": image_size},
    )[0]
    mine = postprocess_masks(low_res[0], image_size, ours["reshaped_input_sizes"][0], ours["original_sizes"][0])
    # same bilinear maths; torch's kernels for (1, 3, h, w) (the processor's layout) and (3, 1, h, w) (ours) may
    # round differently: torch 2.6 on one thread differs by 3.5e-5 on these logits of scale ~4
    assert torch.allclose(mine, post, atol=1e-4)


# ---- encode once, decode per prompt ---------------------------------------------------------------------


def test_decode_matches_sam_point_batch_and_routes_mask_inputs(tiny_sam):
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 32, 16, 16, generator=gen)
    points = torch.randint(0, 256, (2, 3, 2, 2), generator=gen).float()
    labels = torch.tensor([1, 0]).expand(2, 3, 2)
    boxes = torch.tensor([[10.0, 20.0, 90.0, 120.0]]).expand(2, 3, 4)
    prompts = Prompts(points, labels, boxes)
    with torch.no_grad():
        low, iou = decode(tiny_sam, embeddings, prompts, multimask=True)
        out = tiny_sam(image_embeddings=embeddings, input_points=points, input_labels=labels, input_boxes=boxes)
        assert low.shape == (2, 3, 3, 64, 64) and iou.shape == (2, 3, 3)
        assert close(low, out.pred_masks) and close(iou, out.iou_scores)
        masks = torch.randn(2, 3, 1, 64, 64, generator=gen)
        with_masks, _ = decode(tiny_sam, embeddings, prompts, False, masks, torch.tensor([True, True]))
        without, _ = decode(tiny_sam, embeddings, prompts, False)
        mixed, _ = decode(tiny_sam, embeddings, prompts, False, masks, torch.tensor([False, True]))
        single = tiny_sam(image_embeddings=embeddings[1:2].expand(3, -1, -1, -1), input_points=points[1][:, None],
                          input_labels=labels[1][:, None], input_boxes=boxes[1][:, None], input_masks=masks[1],
                          multimask_output=False)
    assert (with_masks - without).abs().max() > 0.01 * without.abs().max()  # each object's mask input is used
    assert close(mixed[0], without[0]) and close(mixed[1], with_masks[1])
    assert close(with_masks[1], single.pred_masks[:, 0])


# ---- seeding and the old import paths -------------------------------------------------------------------


def test_prompt_generator_depends_only_on_its_seed_stream_index_and_rank():
    draw = lambda *key: torch.rand(4, generator=prompt_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 0, 3), draw(0, 0, 3))
    assert not torch.equal(draw(0, 0, 3), draw(0, 1, 3))  # training and validation streams differ
    assert not torch.equal(draw(0, 0, 3), draw(0, 0, 4)) and not torch.equal(draw(0, 0, 3), draw(0, 0, 3, 1))


def test_old_import_paths_name_the_same_objects():
    """Code written against training's modules keeps working: they re-export the shared forward."""
    import hf_sam_peft.sam_forward as shared
    from hf_sam_peft.training import collate, interactive

    for name in ("preprocess_image", "preprocess_shape", "image_preprocessor", "transform_coords", "transform_boxes",
                 "postprocess_masks", "PIXEL_MEAN", "PIXEL_STD", "Preprocess"):
        assert getattr(collate, name) is getattr(shared, name), name
    for name in ("Frames", "Prompts", "decode", "encode_images", "unwrap_sam", "prompt_generator", "TRAIN_STREAM",
                 "EVAL_STREAM", "postprocess_masks", "transform_coords", "transform_boxes"):
        assert getattr(interactive, name) is getattr(shared, name), name
