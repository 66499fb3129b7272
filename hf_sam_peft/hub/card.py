"""The model card (`README.md`) of an adapter, rendered from its provenance alone.

The template is `model_cards/adapter_card.md` (a `string.Template`), shipped inside the installed package.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..methods import METHODS
from .provenance import POINT_MULTIMASK_KEY, _version

CARD_TEMPLATE = "adapter_card.md"
DEFAULT_LICENSE = "apache-2.0"  # SAM's own licence; pass license= when the training data asks for another


def _cell(value: Any, code: bool = False) -> str:
    """A table cell: floats to 4 significant digits, ints with thousands separators; `code` puts strings in
    backticks (regexes and names then show as written, not as markdown)."""
    # bool first: it is an int subclass, and True would otherwise print as "1"
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, str):
        text = f"`{value}`" if code and value else value
    else:
        text = f"`{json.dumps(value)}`"  # lists / dicts (e.g. target_modules) as JSON, not Python's repr
    # a bare | would split the cell and a newline end the table row
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, code: Sequence[str] = ()
) -> str:
    """A GitHub markdown table of `rows` (columns: the keys in order of first appearance; string values of
    the `code` columns in backticks)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, ""), c in code) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _metric_rows(metrics: Any) -> list[dict[str, Any]]:
    """Metrics as table rows: a dict of scalars gives `metric | value` rows, a list of dicts its own columns."""
    if isinstance(metrics, Mapping):
        if any(isinstance(v, (Mapping, list, tuple)) for v in metrics.values()):
            raise ValueError("metrics must be a dict of scalars or a list of dicts (one per table row)")
        return [{"metric": k, "value": v} for k, v in metrics.items()]
    if isinstance(metrics, (list, tuple)) and metrics and all(isinstance(r, Mapping) for r in metrics):
        return [dict(r) for r in metrics]
    raise ValueError(f"metrics must be a dict of scalars or a non-empty list of dicts, got {type(metrics).__name__}")


def _training_data_text(data: Any) -> str:
    if data is None:
        return "Not recorded."
    if isinstance(data, str):
        return data
    if isinstance(data, Mapping):
        return "\n".join(f"- **{k}**: {_cell(v)}" for k, v in data.items())
    return "\n".join(f"- {_cell(v)}" for v in data)


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repo id ("org/name") rather than a local path or a model name."""
    # an existing relative path such as "runs/base" has the shape of an id too: the existence check rules it out
    if not name or name.count("/") != 1 or os.path.exists(name) or name.startswith((".", "/")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _alternative_text(
    method: str, base: str, repo_id: str, has_unetr: bool, quant_type: str | None, model_class: str = "SamModel"
) -> str:
    """How to load without `hf_sam_peft.from_pretrained` (the import still registers our tuner types).

    `model_class`: transformers' class of the base (`SamModel`, or `Sam2Model` for a SAM 2 base).
    """
    if method == "full_ft":
        text = (
            f"This is a fully fine-tuned {model_class} (no adapter); transformers loads it as it is:\n\n"
            f'```python\nfrom transformers import {model_class}\n\nmodel = {model_class}.from_pretrained("{repo_id}")\n```'
        )
    elif method in ("lora", "qlora"):
        # nf4: quantize_image_encoder's own default, for an adapter whose provenance records no quant_type
        quantize = f'hf_sam_peft.quantize_image_encoder(base, quant_type="{quant_type or "nf4"}")\n'
        text = (
            "peft does not record that this LoRA adapts only the q and v slices of the fused `qkv` projections, "
            "so load it onto the base model with `hf_sam_peft.load_adapter` (peft's `PeftModel.from_pretrained` "
            f"underneath):\n\n```python\nimport hf_sam_peft\nfrom transformers import {model_class}\n\n"
            f'base = {model_class}.from_pretrained("{base}")\n{quantize if method == "qlora" else ""}'
            f'model = hf_sam_peft.load_adapter(base, "{repo_id}")\n```'
        )
    else:
        text = (
            "With peft directly: import `hf_sam_peft` first, which registers its tuner types with peft "
            "(without it peft does not know this adapter's type):\n\n```python\nimport hf_sam_peft  # noqa: F401\n"
            f"from peft import PeftModel\nfrom transformers import {model_class}\n\n"
            f'model = PeftModel.from_pretrained({model_class}.from_pretrained("{base}"), "{repo_id}")\n```'
        )
    if has_unetr:
        text += (
            "\n\nThe UNETR decoder for automatic instance segmentation is in `unetr/`: "
            "`hf_sam_peft.modeling.unetr.load_unetr(folder)` reads it without peft; attach it as "
            "`base.unetr_decoder` before loading the adapter by hand."
        )
    return text


def _template_path() -> Path:
    """`model_cards/adapter_card.md`: inside the installed package (setup.py ships the repository's
    top-level `model_cards/` as `hf_sam_peft/model_cards`), else next to the package in a source checkout."""
    package = Path(__file__).resolve().parent.parent  # hf_sam_peft/
    for candidate in (package / "model_cards" / CARD_TEMPLATE, package.parent / "model_cards" / CARD_TEMPLATE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model card template {CARD_TEMPLATE} not found next to the hf_sam_peft package")


def render_card(provenance: Mapping[str, Any], repo_id: str, template: str | os.PathLike | None = None) -> str:
    """The README.md model card of an adapter, from its provenance (`hf_sam_peft.json`) and repo id."""
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a non-empty string, got {repo_id!r}")
    for key in ("method", "trainable_parameters"):
        if key not in provenance:
            raise ValueError(f"provenance lacks {key!r}; write it with hf_sam_peft.hub.save_adapter")
    method = provenance["method"]
    title = provenance.get("method_title") or method
    base = provenance.get("base_model")
    # the Hub picks the "use this model" snippet by library_name: full_ft is a plain transformers model folder
    front = ModelCardData(
        library_name="transformers" if method == "full_ft" else "peft",
        base_model=base if _is_hub_id(base) else None,  # the Hub only accepts repo ids here
        license=provenance.get("license") or DEFAULT_LICENSE,
        pipeline_tag="mask-generation",
        tags=["segment-anything", "hf-sam-peft", method],
    ).to_yaml()

    hyper = provenance.get("hyperparameters") or {}
    # a method outside METHODS (peft_lora: peft's own LoRA, or any method= given by hand) renders without a kind
    paper = METHODS[method] if method in METHODS else None
    method_text = f"**{title}**" + (f" ({paper.kind} fine-tuning of the image encoder)" if paper else "")
    method_text += "; the prompt encoder and mask decoder are trained in full and saved with the adapter."
    point_multimask = provenance.get(POINT_MULTIMASK_KEY)
    if point_multimask is False:
        method_text += (
            " Point prompts were trained through SAM's **single-mask output** (`point_multimask: false` in "
            "`hf_sam_peft.json`): answer a click with `multimask_output=False`, not with SAM's three masks "
            "(hf-sam-peft's predictor, app and `evaluate` do this for you)."
        )
    elif point_multimask is True:
        method_text += (
            " Point prompts were trained through SAM's multimask output, as SAM's own (`point_multimask: true`)."
        )
    if provenance.get("unetr"):
        method_text += (f" A UNETR decoder for automatic instance segmentation ({provenance['unetr'].get('upsampling')}"
                        " upsampling) was trained with it.")
    table = markdown_table([{"hyper-parameter": k, "value": v} for k, v in hyper.items()], code=["value"]) if hyper else (
        "No hyper-parameters: " + ("every weight trains." if method == "full_ft" else "the method has none.")
    )
    if provenance.get("extra"):
        table += "\n\nOther settings:\n\n" + markdown_table(
            [{"setting": k, "value": v} for k, v in provenance["extra"].items()], code=["value"]
        )

    trainable, total = provenance["trainable_parameters"], provenance.get("total_parameters")
    trainable_text = f"**{trainable:,}** trainable parameters"
    if total:
        trainable_text += f" of {total:,} in the model ({100.0 * trainable / total:.2f}%)"
    trainable_text += "."
    sizes = provenance.get("base_model_size") or {}
    size = sizes.get("vision_config.backbone_config") or sizes.get("vision_config")  # SAM 2: Hiera's sizes
    if size:
        trainable_text += " Image encoder: " + ", ".join(f"{k} {v}" for k, v in size.items()) + "."

    metrics = provenance.get("metrics")
    evaluation = "" if not metrics else "\n## Evaluation\n\n" + markdown_table(_metric_rows(metrics)) + "\n"
    base_text = f"[`{base}`](https://huggingface.co/{base})" if _is_hub_id(base) else (
        f"`{base}`" if base else "Not recorded: pass `base_model=` when loading."
    )
    files = provenance.get("files") or []
    model_class = "Sam2Model" if provenance.get("base_model_type") == "sam2" else "SamModel"
    summary = (f"Segment Anything{' 2' if model_class == 'Sam2Model' else ''} (transformers `{model_class}`) "
               f"fine-tuned with hf-sam-peft's `{method}` method.")
    if (provenance.get("extra") or {}).get("best_is_base") is True:
        # validation kept the untouched base (no checkpoint was as good on every prompt mode): say so first
        summary = (f"**Not a fine-tune:** no `{method}` checkpoint was at least as good as the base on every "
                   "validation prompt mode, so this adapter holds the untouched base weights "
                   f"(`best_is_base: true`). " + summary.replace(" fine-tuned with", " set up for"))
    values = {
        "front_matter": front,
        "title": f"{title} adapter for Segment Anything" if method != "full_ft" else "Fine-tuned Segment Anything",
        "summary": summary,
        "base_model_text": base_text,
        "method_text": method_text,
        "hyperparameter_table": table,
        "trainable_text": trainable_text,
        "training_data_text": _training_data_text(provenance.get("training_data")),
        "evaluation_section": evaluation,
        "repo_id": repo_id,
        "alternative_text": _alternative_text(
            method, base or "<base SAM model>", repo_id, bool(provenance.get("unetr")), hyper.get("quant_type"),
            model_class,
        ),
        "file_list": "\n".join(f"- `{f}`" for f in files) if files else "- see the repository",
        # the version that wrote the adapter, not this one: a card re-rendered for push keeps its origin
        "version": provenance.get("hf_sam_peft_version", _version()),
    }
    text = Path(template).read_text(encoding="utf-8") if template is not None else _template_path().read_text("utf-8")
    # substitute, not safe_substitute: a placeholder the values lack is a KeyError, never a "$name" in a card
    return string.Template(text).substitute(values)
