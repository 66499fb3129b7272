"""Saving adapters with their model card and provenance, pushing them to the Hub, and loading them back.

An adapter folder (local, or a Hub repo) written by `save_adapter` holds:

- `adapter_config.json` + `adapter_model.safetensors`: peft's own files (the image-encoder adapter and the
  trained prompt encoder / mask decoder copies). For `full_ft` there is no adapter: `config.json` +
  `model.safetensors` of the whole SamModel instead.
- `unetr/unetr_config.json` + `unetr/unetr.safetensors` when the model carries a UNETR decoder
  (`model.unetr_decoder`). It is always written here, the one copy AIS tools can read without peft
  (`hf_sam_peft.modeling.unetr.load_unetr`). When training listed `unetr_decoder` in the peft config's
  `modules_to_save` (the cleanest way to train it next to an adapter), the adapter file holds the same
  weights as well; `from_pretrained` attaches the `unetr/` copy before peft loads, so both routes agree.
- `hf_sam_peft.json`: provenance (method, hyper-parameters, base model id and size, trainable parameter
  count, library version, training data, metrics, and `point_multimask`: whether point prompts were trained
  through SAM's multimask output (true), its single-mask output (false, e.g. LiteMedSAM, trained on boxes
  only) or not recorded (null)) — everything the model card is rendered from, so a pushed card can be
  re-rendered for another repo id without the model.
- `README.md`: the model card, from `model_cards/adapter_card.md` (a `string.Template`).

`from_pretrained(adapter_id)` is the one-line way back: it resolves a local folder or a Hub repo id through
huggingface_hub (online, or offline from the Hub cache with `HF_HUB_OFFLINE=1`: the same call), loads the
base model the adapter names and puts the adapter on it with `load_adapter_folder`, the one adapter loader
(also behind `hf_sam_peft.evaluation.load_model` and the app): size check, UNETR decoder, QLoRA's 4-bit
encoder, then `hf_sam_peft.load_adapter`. It also sets the recorded `point_multimask` on the model, so
`hf_sam_peft.evaluation.SamPredictor(model)` answers a click through the output the adapter was trained for.

One module per concern: :mod:`.provenance` (the folder's file names, `hf_sam_peft.json`), :mod:`.card`
(the model card), :mod:`.save` (`save_adapter`), :mod:`.push` (uploads) and :mod:`.load`
(`from_pretrained`). Every public name is importable from `hf_sam_peft.hub` itself.
"""

from __future__ import annotations

from .card import CARD_TEMPLATE, DEFAULT_LICENSE, markdown_table, render_card
from .load import (
    HUB_KWARGS,
    adapter_unetr_settings,
    check_adapter_folder,
    from_pretrained,
    load_adapter_folder,
    recorded_quant_type,
    resolve_adapter_folder,
)
from .provenance import (
    ADAPTER_CONFIG_NAME,
    CARD_NAME,
    POINT_MULTIMASK_KEY,
    PROVENANCE_NAME,
    REPO_FILES,
    UNETR_SUBFOLDER,
    describe_model,
    read_json_file,
    read_provenance,
    recorded_point_multimask,
    recorded_resize_inputs,
)
from .push import DEFAULT_COMMIT_MESSAGE, prepare_upload, push_adapter_to_hub, push_folder_to_hub
from .save import save_adapter

__all__ = [
    "ADAPTER_CONFIG_NAME", "CARD_NAME", "CARD_TEMPLATE", "DEFAULT_COMMIT_MESSAGE", "DEFAULT_LICENSE", "HUB_KWARGS",
    "POINT_MULTIMASK_KEY", "PROVENANCE_NAME", "REPO_FILES", "UNETR_SUBFOLDER", "adapter_unetr_settings",
    "check_adapter_folder", "describe_model", "from_pretrained", "load_adapter_folder", "markdown_table",
    "prepare_upload", "push_adapter_to_hub", "push_folder_to_hub", "read_json_file", "read_provenance",
    "recorded_point_multimask", "recorded_quant_type", "recorded_resize_inputs", "render_card", "resolve_adapter_folder", "save_adapter",
]
