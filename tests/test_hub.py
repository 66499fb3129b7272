"""Saving adapters with model card + provenance, pushing them (at the huggingface_hub API boundary, no
network) and loading them back from a local folder or an offline Hub cache laid out as huggingface_hub
lays it out."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import hf_sam_peft
from hf_sam_peft import hub
from hf_sam_peft.evaluation.metrics import mean_segmentation_accuracy, segmentation_accuracy_at
from hf_sam_peft.methods import apply_method, count_parameters
from hf_sam_peft.modeling.sam import tiny_sam_config
from hf_sam_peft.modeling.unetr import attach_unetr, load_unetr, predict_distances
from hf_sam_peft.tuners.base import default_modules_to_save

SMALL_UNETR = (32, 16, 8, 4)
ADAPTER_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "hf_sam_peft.json",
    "unetr/unetr.safetensors", "unetr/unetr_config.json",
}


# ------------------------------------------------------------------------------------------- helpers


def _toy_batch() -> dict:
    """A 256² image with two bright rectangles, their instance labels and ground-truth boxes."""
    labels = np.zeros((256, 256), dtype=np.int32)
    labels[40:100, 50:120] = 1
    labels[150:220, 140:200] = 2
    g = torch.Generator().manual_seed(0)
    image = 0.2 * torch.rand(1, 3, 256, 256, generator=g) + 0.8 * torch.from_numpy(labels > 0).float()
    boxes = torch.tensor([[[50.0, 40.0, 120.0, 100.0], [140.0, 150.0, 200.0, 220.0]]])
    targets = torch.from_numpy(np.stack([labels == 1, labels == 2])).float()[None]  # (1, 2, 256, 256)
    return {"pixel_values": image, "input_boxes": boxes, "targets": targets, "labels": labels}


def _mask_logits(model, batch) -> torch.Tensor:
    out = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    return F.interpolate(out.pred_masks[:, :, 0], size=(256, 256), mode="bilinear", align_corners=False)


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return 1 - (2 * (p * target).sum() / ((p * p).sum() + (target * target).sum()))


def _train(model, batch, steps: int = 2) -> None:
    """A few AdamW steps on mask Dice + UNETR foreground MSE, so every saved part differs from its init."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    fg = (batch["targets"].sum(1) > 0).float()
    for _ in range(steps):
        loss = _dice_loss(_mask_logits(model, batch), batch["targets"])
        loss = loss + F.mse_loss(predict_distances(model, batch["pixel_values"])[:, 0], fg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _instances(logits: torch.Tensor) -> np.ndarray:
    """Per-box masks (logits > 0) painted into one instance label image (first prompt wins)."""
    masks = (logits[0] > 0).numpy()
    out = np.zeros(masks.shape[1:], dtype=np.int32)
    for i, mask in enumerate(masks, start=1):
        out[mask & (out == 0)] = i
    return out


@torch.no_grad()
def _outputs(model, batch) -> dict[str, torch.Tensor]:
    out = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    sam = model.get_base_model() if hasattr(model, "get_base_model") else model
    result = {
        "embeddings": sam.vision_encoder(batch["pixel_values"]).last_hidden_state,
        "pred_masks": out.pred_masks,
        "iou_scores": out.iou_scores,
    }
    if hasattr(sam, "unetr_decoder"):
        result["distances"] = predict_distances(model, batch["pixel_values"])
    return result


def _assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _cache_repo(cache_dir: Path, repo_id: str, folder: Path) -> Path:
    """Lay `folder` out as huggingface_hub's cache does after a download: blobs named by their etag (sha256
    for LFS files such as safetensors, the git blob sha1 otherwise), `snapshots/<commit>/<path>` as relative
    symlinks to them, and `refs/main` holding the commit."""
    from huggingface_hub.file_download import repo_folder_name

    storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors" else _git_blob_sha1(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return storage


class FakeHfApi:
    """The two HfApi calls `push` makes, recording what would reach the Hub."""

    instances: list["FakeHfApi"] = []

    def __init__(self, token=None):
        self.token = token
        self.calls: list[tuple] = []
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, exist_ok=False, private=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, exist_ok, private, repo_type))

        class RepoUrl(str):
            pass

        url = RepoUrl(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, repo_id, folder_path, commit_message=None, repo_type=None, allow_patterns=None):
        import fnmatch

        root = Path(folder_path)
        files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        if allow_patterns is not None:  # as huggingface_hub filters the folder
            files = {f for f in files if any(fnmatch.fnmatchcase(f, pat) for pat in allow_patterns)}
        readme = (root / "README.md").read_text() if (root / "README.md").is_file() else ""
        self.calls.append(("upload_folder", repo_id, files, commit_message, repo_type, readme))

        class CommitInfo:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc123"

        return CommitInfo()


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SAM, saved as the base, then FacT + UNETR trained for a few steps, with real metrics."""
    from transformers import SamModel

    torch.manual_seed(0)
    base = SamModel(tiny_sam_config()).eval()
    base_dir = tmp_path_factory.mktemp("base") / "tiny-sam"
    base.save_pretrained(base_dir)
    attach_unetr(base, features=SMALL_UNETR)
    model = apply_method(base, "fact", modules_to_save=default_modules_to_save() + ["unetr_decoder"])
    batch = _toy_batch()
    before = _outputs(model, batch)
    _train(model, batch)
    after = _outputs(model, batch)
    assert not torch.equal(before["pred_masks"], after["pred_masks"])
    assert not torch.equal(before["distances"], after["distances"])
    with torch.no_grad():
        prediction = _instances(_mask_logits(model, batch))
    metrics = {
        "mSA": mean_segmentation_accuracy(prediction, batch["labels"]),
        "SA50": segmentation_accuracy_at(prediction, batch["labels"], 0.5),
    }
    return {"model": model, "base_dir": base_dir, "batch": batch, "metrics": metrics, "outputs": after}


@pytest.fixture(scope="module")
def hub_cache(trained, tmp_path_factory):
    """An offline Hub cache with the adapter as "org/name" and its base as "org/tiny-sam"."""
    root = tmp_path_factory.mktemp("hub")
    adapter_dir = hub.save_adapter(
        trained["model"], root / "adapter", base_model_id="org/tiny-sam", repo_id="org/name",
        metrics=trained["metrics"], training_data="two synthetic rectangles (test)",
    )
    cache = root / "cache"
    _cache_repo(cache, "org/name", adapter_dir)
    _cache_repo(cache, "org/tiny-sam", trained["base_dir"])
    return cache


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub, peft and transformers read it at call time."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# ---------------------------------------------------------------------------------------- model card


def test_save_adapter_writes_card_with_real_numbers(trained, tmp_path):
    model, metrics = trained["model"], trained["metrics"]
    out = hub.save_adapter(
        model, tmp_path / "adapter", base_model_id="org/tiny-sam", repo_id="org/name", metrics=metrics,
        training_data=["two synthetic rectangles"], extra={"learning_rate": 1e-3, "steps": 2},
    )
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == ADAPTER_FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    # unetr/ holds the trained (active modules_to_save) copy of the decoder, readable without peft
    trained_decoder = model.base_model.model.unetr_decoder.modules_to_save["default"].state_dict()
    saved_decoder = load_unetr(out / "unetr").state_dict()
    assert trained_decoder.keys() == saved_decoder.keys()
    assert all(torch.equal(trained_decoder[k], saved_decoder[k]) for k in trained_decoder)
    original = model.base_model.model.unetr_decoder.original_module.state_dict()
    assert not all(torch.equal(original[k], saved_decoder[k]) for k in original)

    trainable = count_parameters(model)[0]
    assert trainable > 0
    provenance = json.loads((out / "hf_sam_peft.json").read_text())
    assert provenance["method"] == "fact"
    assert provenance["trainable_parameters"] == trainable
    assert provenance["hyperparameters"]["r"] == model.peft_config["default"].r
    assert provenance["base_model"] == "org/tiny-sam"
    assert provenance["hf_sam_peft_version"] == hf_sam_peft.__version__
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-sam"

    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "peft"
    assert front["base_model"] == "org/tiny-sam"
    assert {"segment-anything", "hf-sam-peft", "fact"} <= set(front["tags"])
    assert front["license"] == "apache-2.0"
    assert f"**{trainable:,}** trainable parameters" in card
    assert f"| mSA | {metrics['mSA']:.4g} |" in card
    assert f"| SA50 | {metrics['SA50']:.4g} |" in card
    assert f"| r | {model.peft_config['default'].r} |" in card
    assert "| learning_rate | 0.001 |" in card
    assert "- two synthetic rectangles" in card
    assert 'model = hf_sam_peft.from_pretrained("org/name")' in card
    # the plain peft route imports hf_sam_peft (tuner registration) before peft loads the adapter
    peft_snippet = card[card.index("With peft directly"):]
    assert peft_snippet.index("import hf_sam_peft") < peft_snippet.index("PeftModel.from_pretrained(")


def test_card_metrics_as_rows_and_lora_snippet(tiny_sam, tmp_path):
    torch.manual_seed(1)
    model = apply_method(tiny_sam, "lora", r=4)
    rows = [{"dataset": "toy", "prompt": "box", "dice": 0.75}, {"dataset": "toy", "prompt": "point", "dice": 0.5}]
    out = hub.save_adapter(model, tmp_path / "lora", base_model_id="org/tiny-sam", metrics=rows)
    card = (out / "README.md").read_text()
    assert "| dataset | prompt | dice |" in card and "| toy | point | 0.5 |" in card
    assert json.loads((out / "hf_sam_peft.json").read_text())["method"] == "lora"
    assert 'base = SamModel.from_pretrained("org/tiny-sam")\nmodel = hf_sam_peft.load_adapter(base, ' in card
    assert f"**{count_parameters(model)[0]:,}**" in card
    assert f'hf_sam_peft.from_pretrained("{tmp_path / "lora"}")' in card  # local folder: the snippet uses it


def test_card_says_when_validation_kept_the_base(tiny_sam, tmp_path):
    model = apply_method(tiny_sam, "lora", r=4)
    kept = hub.save_adapter(model, tmp_path / "base", base_model_id="org/tiny-sam", extra={"best_is_base": True})
    card = (kept / "README.md").read_text()
    assert "**Not a fine-tune:**" in card and "fine-tuned with" not in card
    tuned = hub.save_adapter(model, tmp_path / "tuned", base_model_id="org/tiny-sam", extra={"best_is_base": False})
    assert "Not a fine-tune" not in (tuned / "README.md").read_text()


def test_save_adapter_is_atomic_and_refuses_to_overwrite(trained, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="overwrite=True"):
        hub.save_adapter(trained["model"], out)

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub.save, "render_card", broken_card)  # where save_adapter looks it up
    with pytest.raises(RuntimeError, match="disk full"):
        hub.save_adapter(trained["model"], out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # and no temp folder is left
    monkeypatch.undo()

    hub.save_adapter(trained["model"], out, overwrite=True)
    assert {p.name for p in out.iterdir()} == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                                 "hf_sam_peft.json", "unetr"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_adapter_validates_arguments(trained, tmp_path):
    with pytest.raises(ValueError, match="metrics"):
        hub.save_adapter(trained["model"], tmp_path / "a", metrics={"mSA": [0.1, 0.2]})
    with pytest.raises(TypeError, match="extra"):
        hub.save_adapter(trained["model"], tmp_path / "a", extra=["lr"])
    with pytest.raises(TypeError, match="model"):
        hub.save_adapter("not a model", tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------- push


def test_push_uploads_exact_file_set(trained, monkeypatch):
    import huggingface_hub

    FakeHfApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    url = hub.push_adapter_to_hub(
        trained["model"], "org/name", private=True, token="hf_test", base_model_id="org/tiny-sam",
        metrics=trained["metrics"],
    )
    (api,) = FakeHfApi.instances
    assert api.token == "hf_test"
    assert api.calls[0] == ("create_repo", "org/name", True, True, "model")
    _, repo_id, files, message, repo_type, readme = api.calls[1]
    assert (repo_id, repo_type, message) == ("org/name", "model", hub.DEFAULT_COMMIT_MESSAGE)
    assert files == ADAPTER_FILES
    assert 'hf_sam_peft.from_pretrained("org/name")' in readme
    assert f"| mSA | {trained['metrics']['mSA']:.4g} |" in readme
    assert url == "https://huggingface.co/org/name/commit/abc123"


def test_push_rejects_bad_repo_id(trained):
    api = FakeHfApi()
    with pytest.raises(ValueError, match="repo_id"):
        hub.push_adapter_to_hub(trained["model"], "not a/valid/id", api=api)
    assert api.calls == []


def test_push_command_dry_run_and_folder_push(trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from hf_sam_peft.commands import push

    adapter = hub.save_adapter(trained["model"], tmp_path / "checkpoint-3", base_model_id="org/tiny-sam")
    (adapter / "optimizer.pt").write_bytes(b"not for the Hub")  # a Trainer checkpoint holds such files
    (adapter / "trainer_state.json").write_text("{}")

    class NoNetwork:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a dry run must not touch the Hub")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    parser = argparse.ArgumentParser()
    push.register(parser.add_subparsers())
    args = parser.parse_args(["push", str(adapter), "org/name", "--dry-run"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert 'hf_sam_peft.from_pretrained("org/name")' in printed
    listed = {line.split()[0] for line in printed.splitlines() if line.startswith("  ")}
    assert listed == ADAPTER_FILES

    FakeHfApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    args = parser.parse_args(["push", str(adapter), "org/name", "--private", "--token", "t"])
    assert args.func(args) == 0
    (api,) = FakeHfApi.instances
    assert api.calls[0][1:4] == ("org/name", True, True)
    assert api.calls[1][2] == ADAPTER_FILES
    assert 'from_pretrained("org/name")' in api.calls[1][5]


# ---------------------------------------------------------------------------------------------- load


def test_hub_cache_layout_is_what_huggingface_hub_reads(hub_cache):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(hub_cache)
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"org/name", "org/tiny-sam"}
    (revision,) = repos["org/name"].revisions
    assert {f.file_name for f in revision.files} >= {"adapter_model.safetensors", "unetr.safetensors"}
    assert try_to_load_from_cache("org/name", "hf_sam_peft.json", cache_dir=hub_cache) is not None


def test_from_pretrained_offline_cache_reproduces_trained_outputs(trained, hub_cache, offline):
    loaded = hub.from_pretrained("org/name", cache_dir=hub_cache)
    assert type(loaded).__name__ == "PeftModel"
    assert loaded.peft_config["default"].base_model_name_or_path == "org/tiny-sam"
    _assert_same_outputs(_outputs(loaded, trained["batch"]), trained["outputs"])
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default

    trainable = hub.from_pretrained("org/name", cache_dir=hub_cache, is_trainable=True)
    assert count_parameters(trainable)[0] == count_parameters(trained["model"])[0]


def test_plain_peft_loads_custom_tuner_from_offline_cache(trained, hub_cache, offline):
    """The card's by-hand route: base from the cache, UNETR attached from `unetr/`, then peft itself."""
    from huggingface_hub import hf_hub_download
    from peft import PeftModel
    from transformers import SamModel

    base = SamModel.from_pretrained("org/tiny-sam", cache_dir=hub_cache)
    unetr_dir = Path(hf_hub_download("org/name", "unetr/unetr_config.json", cache_dir=hub_cache)).parent
    hf_hub_download("org/name", "unetr/unetr.safetensors", cache_dir=hub_cache)
    base.unetr_decoder = load_unetr(unetr_dir)
    loaded = PeftModel.from_pretrained(base, "org/name", cache_dir=hub_cache)
    assert isinstance(loaded.peft_config["default"], hf_sam_peft.FactConfig)
    _assert_same_outputs(_outputs(loaded, trained["batch"]), trained["outputs"])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_from_pretrained_local_lora_folder(method, tiny_sam, tmp_path):
    """q/v LoRA (re-registered on load) and QLoRA (base quantized on load) round-trip through a local folder
    with an explicit base."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the 'quant' extra)")
    base_dir = tmp_path / "base"
    tiny_sam.save_pretrained(base_dir)
    model = apply_method(tiny_sam, method, r=4)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA starts as the identity: make it change the outputs
    batch = _toy_batch()
    expected = _outputs(model, batch)
    out = hub.save_adapter(model, tmp_path / "lora")
    provenance = hub.read_provenance(out)
    assert provenance["method"] == method
    assert ("quant_type" in provenance["hyperparameters"]) == (method == "qlora")
    loaded = hub.from_pretrained(out, base_model=str(base_dir))
    _assert_same_outputs(_outputs(loaded, batch), expected)


def test_full_fine_tuning_round_trip(tiny_sam, tmp_path):
    model = apply_method(tiny_sam, "full_ft")
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.proj_out.bias.add_(0.5)
    batch = _toy_batch()
    expected = _outputs(model, batch)
    out = hub.save_adapter(model, tmp_path / "full", base_model_id="org/tiny-sam")
    assert {p.name for p in out.iterdir()} == {"README.md", "config.json", "model.safetensors", "hf_sam_peft.json"}
    assert _front_matter((out / "README.md").read_text())["library_name"] == "transformers"
    loaded = hub.from_pretrained(out)
    _assert_same_outputs(_outputs(loaded, batch), expected)


# ------------------------------------------------------------------------------------------ bad input


def test_base_of_another_size_is_a_clear_error(trained, hub_cache, tmp_path, offline):
    from transformers import SamModel

    other = SamModel(tiny_sam_config(hidden_size=32))
    with pytest.raises(ValueError, match=r"does not fit this base model .*hidden_size 64 in the adapter but 32") as err:
        hub.from_pretrained("org/name", base_model=other, cache_dir=hub_cache)
    assert "\n" not in str(err.value)

    # an adapter saved by peft alone (no hf_sam_peft.json): the size check is load_adapter's
    plain = tmp_path / "plain"
    trained["model"].save_pretrained(plain, save_embedding_layers=False)
    other = SamModel(tiny_sam_config(hidden_size=32))
    attach_unetr(other, features=SMALL_UNETR)
    with pytest.raises(ValueError, match="does not fit this base model"):
        hub.from_pretrained(plain, base_model=other)


def test_missing_repos_in_offline_cache_are_clear_errors(trained, hub_cache, tmp_path, offline):
    with pytest.raises(FileNotFoundError, match=r"'org/missing' is not a local folder and not in the Hub cache .*HF_HUB_OFFLINE"):
        hub.from_pretrained("org/missing", cache_dir=hub_cache)

    # the adapter is cached but the base it names is not
    adapter = hub.save_adapter(trained["model"], tmp_path / "a", base_model_id="org/absent-base")
    _cache_repo(tmp_path / "cache", "org/orphan", adapter)
    with pytest.raises(FileNotFoundError, match="base model 'org/absent-base' could not be loaded"):
        hub.from_pretrained("org/orphan", cache_dir=tmp_path / "cache")


def test_from_pretrained_validates_arguments(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword"):
        hub.from_pretrained("org/name", device_map="cpu")
    with pytest.raises(TypeError, match="adapter_id"):
        hub.from_pretrained(3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a peft adapter"):
        hub.from_pretrained(tmp_path / "empty")


# ------------------------------------------------------------------------------- point_multimask record


def test_point_multimask_is_recorded_carded_and_loaded(tiny_sam, tmp_path):
    """save_adapter(point_multimask=False) -> hf_sam_peft.json + card; from_pretrained and load_model carry it to
    the model and the predictor; an adapter saved without it keeps SAM's multimask behaviour."""
    from hf_sam_peft.evaluation.predictor import SamPredictor, load_model, point_multimask_of

    base_dir = tmp_path / "base"
    tiny_sam.save_pretrained(base_dir)
    model = apply_method(tiny_sam, "lora", r=4)
    single = hub.save_adapter(model, tmp_path / "single", base_model_id=str(base_dir), point_multimask=False)
    plain = hub.save_adapter(model, tmp_path / "plain", base_model_id=str(base_dir))
    multi = hub.save_adapter(model, tmp_path / "multi", base_model_id=str(base_dir), point_multimask=True)
    assert hub.read_provenance(single)["point_multimask"] is False
    assert hub.read_provenance(plain)["point_multimask"] is None
    assert hub.read_provenance(multi)["point_multimask"] is True
    assert hub.recorded_point_multimask(single) is False and hub.recorded_point_multimask(str(plain)) is None
    assert "single-mask output" in (single / "README.md").read_text()
    assert "Point prompts were trained" not in (plain / "README.md").read_text()
    assert "multimask output, as SAM's own" in (multi / "README.md").read_text()

    loaded = hub.from_pretrained(single)
    assert point_multimask_of(loaded) is False and SamPredictor(loaded).point_multimask is False
    assert point_multimask_of(hub.from_pretrained(plain)) is True
    assert point_multimask_of(load_model(str(base_dir), str(single))) is False
    assert point_multimask_of(load_model(str(base_dir), str(plain))) is True
    assert point_multimask_of(load_model(str(base_dir), str(multi))) is True
    # saving a loaded adapter again keeps what it recorded (prepare_upload of a peft-only folder re-saves too)
    again = hub.save_adapter(loaded, tmp_path / "again")
    assert hub.read_provenance(again)["point_multimask"] is False


def test_point_multimask_bad_values_and_unknown_repos(tiny_sam, tmp_path, offline):
    with pytest.raises(TypeError, match="point_multimask"):
        hub.save_adapter(tiny_sam, tmp_path / "a", point_multimask="no")
    assert not (tmp_path / "a").exists()
    assert hub.recorded_point_multimask("org/not-in-any-cache") is None  # nothing recorded, nothing reachable
    assert hub.recorded_point_multimask({"point_multimask": False}) is False


# ------------------------------------------------------------------------------------------ SAM 2


@pytest.fixture
def tiny_sam2():
    from transformers import Sam2Model

    from hf_sam_peft.modeling.sam2 import tiny_sam2_config

    torch.manual_seed(0)
    return Sam2Model(tiny_sam2_config()).eval()


@pytest.mark.parametrize("method", ["lora", "fact"])
def test_sam2_adapter_round_trip_and_card(method, tiny_sam2, tmp_path):
    """A SAM 2 adapter saves with a card that loads it with Sam2Model, and loads back to the same outputs."""
    base_dir = tmp_path / "base"
    tiny_sam2.save_pretrained(base_dir)
    model = apply_method(tiny_sam2, method, r=4).eval()  # eval: FacT's dropout off
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "fact_" in name or ".V" in name):
                p.add_(0.3 * torch.randn_like(p))  # leave the identity start: the outputs must change
    batch = _toy_batch()
    expected = _outputs(model, batch)
    out = hub.save_adapter(model, tmp_path / method, base_model_id=str(base_dir))
    provenance = hub.read_provenance(out)
    assert provenance["base_model_type"] == "sam2"
    assert provenance["base_model_size"]["vision_config.backbone_config"]["hidden_size"] == 16
    card = (out / "README.md").read_text()
    assert "from transformers import Sam2Model" in card and "SamModel" not in card.replace("Sam2Model", "")
    loaded = hub.from_pretrained(out)
    _assert_same_outputs(_outputs(loaded, batch), expected)


def test_sam2_full_fine_tuning_round_trip(tiny_sam2, tmp_path):
    from transformers import Sam2Model

    model = apply_method(tiny_sam2, "full_ft")
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.proj_out.bias.add_(0.5)
    batch = _toy_batch()
    expected = _outputs(model, batch)
    out = hub.save_adapter(model, tmp_path / "full", base_model_id="org/tiny-sam2")
    loaded = hub.from_pretrained(out)
    assert isinstance(loaded, Sam2Model)
    _assert_same_outputs(_outputs(loaded, batch), expected)


def test_sam2_adapter_on_another_hiera_size_is_a_clear_error(tiny_sam2, tmp_path):
    from transformers import Sam2Model

    from hf_sam_peft.modeling.sam2 import tiny_sam2_config

    out = hub.save_adapter(apply_method(tiny_sam2, "ssf"), tmp_path / "ssf", base_model_id="org/tiny-sam2")
    other = Sam2Model(tiny_sam2_config(hidden_size=8))
    with pytest.raises(ValueError, match=r"does not fit this base model .*hidden_size 16 in the adapter but 8"):
        hub.from_pretrained(out, base_model=other)


# ------------------------------------------------------------------ one adapter loader, every caller


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _moved(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every trainable tensor moved off its initial value (adapters start as the identity), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.add_(0.3 * torch.randn(param.shape, generator=generator) * (param.abs().mean() + 0.05))
    return model.eval()


# every paper method that saves an adapter (full_ft saves the whole model: test_full_fine_tuning_round_trip),
# and a LoRA adapter with a UNETR head in each of the two layouts
LOADER_CASES = (*(m for m in hf_sam_peft.METHOD_NAMES if m != "full_ft"), "unetr_in_adapter", "unetr_in_folder")


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    """The tiny base saved as a folder; per case an adapter folder (save_adapter) and the outputs of the model it
    was saved from. `unetr_in_adapter`: the decoder trained in `modules_to_save` (so also in `unetr/`);
    `unetr_in_folder`: a decoder only in `unetr/`, beside an adapter whose weights hold none."""
    import copy

    from transformers import SamModel

    from hf_sam_peft.modeling.unetr import save_unetr
    from hf_sam_peft.sam_forward import unwrap_sam

    root = tmp_path_factory.mktemp("every_method")
    torch.manual_seed(0)
    base = SamModel(tiny_sam_config()).eval()
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    batch = _toy_batch()
    cases = {}
    for seed, case in enumerate(LOADER_CASES, start=1):
        if case == "qlora" and not _has_bitsandbytes():
            continue
        sam = copy.deepcopy(base)
        if case == "unetr_in_adapter":
            torch.manual_seed(seed)
            attach_unetr(sam, features=SMALL_UNETR)
        method = case if case in hf_sam_peft.METHOD_NAMES else "lora"
        model = _moved(apply_method(sam, method, **({"r": 4} if method in ("lora", "qlora") else {})), seed)
        folder = hub.save_adapter(model, root / case, base_model_id=str(base_dir))
        if case == "unetr_in_folder":
            torch.manual_seed(seed)
            decoder = _moved(attach_unetr(copy.deepcopy(base), features=SMALL_UNETR), seed)
            save_unetr(decoder, folder / "unetr")
            setattr(unwrap_sam(model), "unetr_decoder", decoder)
        cases[case] = {"folder": folder, "outputs": _outputs(model, batch)}
    return {"base": base, "base_dir": base_dir, "batch": batch, "cases": cases}


def _case(every_method, case):
    if case not in every_method["cases"]:
        pytest.skip("QLoRA needs bitsandbytes (the 'quant' extra)")
    return every_method["cases"][case]


@pytest.mark.parametrize("case", LOADER_CASES)
def test_from_pretrained_and_load_model_load_every_method_alike(every_method, case):
    """hub.from_pretrained and evaluation.load_model both go through load_adapter_folder: each reproduces the
    saved model's image embeddings, masks, IoU and (with a UNETR head) distances exactly. QLoRA included, whose
    image encoder both loaders quantize again (evaluation's loader once kept it full precision)."""
    from hf_sam_peft.evaluation.predictor import has_unetr, load_model
    from hf_sam_peft.hub.provenance import _is_quantized
    from hf_sam_peft.sam_forward import unwrap_sam

    saved = _case(every_method, case)
    base_dir, batch = every_method["base_dir"], every_method["batch"]
    for loaded in (hub.from_pretrained(saved["folder"]), load_model(str(base_dir), str(saved["folder"]))):
        _assert_same_outputs(_outputs(loaded, batch), saved["outputs"])
        assert has_unetr(loaded) == case.startswith("unetr")
        assert _is_quantized(unwrap_sam(loaded)) == ("nf4" if case == "qlora" else None)
        assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference


def test_the_app_bank_holds_every_method_at_once(every_method):
    """One ModelBank with every case: switching in place gives each adapter its saved outputs, and the base its
    own (full precision: QLoRA's 4-bit encoder lives on a copy of its own, never under "base")."""
    from transformers import SamModel

    from hf_sam_peft.app import BASE_NAME, ModelBank

    cases, batch = every_method["cases"], every_method["batch"]
    bank = ModelBank(SamModel.from_pretrained(every_method["base_dir"]), [str(c["folder"]) for c in cases.values()])
    assert bank.names == [BASE_NAME, *cases]
    assert [bank.has_decoder(name) for name in cases] == [name.startswith("unetr") for name in cases]
    expected = dict(cases, **{BASE_NAME: {"outputs": _outputs(every_method["base"], batch)}})
    for name in [*cases, BASE_NAME, *reversed(list(cases))]:  # back and forth: nothing leaks between them
        with bank.use(name) as model:
            got = _outputs(model, batch)
        want = expected[name]["outputs"]
        _assert_same_outputs({k: got[k] for k in want}, want)  # a group's placeholder decoder: not compared


def test_full_model_folder_is_a_base_not_an_adapter(every_method, tmp_path):
    """A full fine-tune (config.json + model.safetensors) loads as the base; as an adapter, a one-line error
    that says so."""
    from hf_sam_peft.evaluation.predictor import load_model

    model = apply_method(every_method["base"].__class__.from_pretrained(every_method["base_dir"]), "full_ft")
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.proj_out.bias.add_(0.5)
    out = hub.save_adapter(model, tmp_path / "full", base_model_id=str(every_method["base_dir"]))
    _assert_same_outputs(_outputs(load_model(str(out)), every_method["batch"]), _outputs(model, every_method["batch"]))
    with pytest.raises(FileNotFoundError, match="is a complete SAM model .*load it as the base model") as caught:
        load_model(str(every_method["base_dir"]), str(out))
    assert "\n" not in str(caught.value)


def test_a_qlora_adapter_is_not_added_to_full_precision_adapters(every_method):
    from transformers import SamModel

    from hf_sam_peft.hub.load import load_adapter_folder

    lora, qlora = _case(every_method, "lora"), _case(every_method, "qlora")
    model = hub.from_pretrained(lora["folder"], base_model=SamModel.from_pretrained(every_method["base_dir"]))
    with pytest.raises(ValueError, match="is QLoRA .*full precision and already holds adapters"):
        load_adapter_folder(model, qlora["folder"], adapter_name="q")
    assert list(model.peft_config) == ["default"]
