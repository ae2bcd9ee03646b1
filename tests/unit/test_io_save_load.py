"""peftkern.save -> peftkern.load gives the same logits, for every registered method.

Parametrised over ``peftkern.methods()``, so a method registered later is covered
without editing this file; ``REQUIRED_OPTIONS`` lists what a method cannot default.
"""
import copy
import json

import pytest
import torch

import peftkern
from peftkern import patching
from tests.helpers.adapters import REQUIRED_OPTIONS, logits, options_for, patched, perturb  # noqa: F401
from tests.helpers.models import tokens

CASES = [("llama", "lm"), ("bert", "cls")]


@pytest.mark.parametrize("family,head", CASES)
@pytest.mark.parametrize("method", peftkern.methods())
def test_save_load_round_trip(tmp_path, method, family, head):
    base, model = patched(family, head, method)
    ids = tokens()
    peftkern.save(model, tmp_path)
    assert (tmp_path / "peftkern_config.json").is_file() and (tmp_path / "peftkern_model.safetensors").is_file()
    loaded = peftkern.load(copy.deepcopy(base), tmp_path).eval()
    assert patching.is_patched(loaded) and loaded.peftkern.plan.method == method
    want = logits(model, ids)
    assert not torch.allclose(want, logits(base, ids), atol=1e-4), "the adapter must change the output"
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-6)
    assert [s for s in loaded.peftkern.plan.slots] == [s for s in model.peftkern.plan.slots]
    assert peftkern.count(loaded) == peftkern.count(model)  # same trainable set, head included


def test_config_records_what_load_needs(tmp_path):
    base, model = patched("bert", "cls", "tied_lora", tie="AB", train="ABuv")
    peftkern.save(model, tmp_path)
    cfg = json.loads((tmp_path / "peftkern_config.json").read_text())
    plan = model.peftkern.plan
    assert cfg["method"] == "tied_lora" and cfg["rank"] == 4 and cfg["alpha"] == plan.alpha
    assert cfg["options"] == {"tie": "AB", "train": "ABuv", "joint": False}
    assert [s["path"] for s in cfg["slots"]] == [s.path for s in plan.slots]
    assert cfg["extra"] == json.loads(json.dumps(model.peftkern.extra_config()))
    assert cfg["heads"] == ["classifier.bias", "classifier.weight"]
    assert cfg["peftkern_version"] == peftkern.__version__


def test_heads_are_restored(tmp_path):
    base, model = patched("bert", "cls", "lora")
    peftkern.save(model, tmp_path)
    loaded = peftkern.load(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    assert not torch.equal(loaded.classifier.weight, base.classifier.weight)
    assert loaded.classifier.weight.requires_grad


def test_joint_and_frozen_factor_variants_round_trip(tmp_path):
    for i, (method, opts) in enumerate([("tied_lora", {"joint": True}), ("lora", {"train": "B"})]):
        base, model = patched("llama", "lm", method, **opts)
        peftkern.save(model, tmp_path / str(i))
        loaded = peftkern.load(copy.deepcopy(base), tmp_path / str(i))
        torch.testing.assert_close(logits(loaded, tokens()), logits(model, tokens()), rtol=0, atol=1e-6)


def test_loaded_model_keeps_training(tmp_path):
    """A loaded adapter is a live adapter: its parameters get gradients."""
    base, model = patched("llama", "lm", "lora")
    peftkern.save(model, tmp_path)
    loaded = peftkern.load(copy.deepcopy(base), tmp_path)
    ids = tokens()
    loaded(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in loaded.peftkern.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_save_overwrites_previous_adapter(tmp_path):
    base, model = patched("llama", "lm", "lora")
    peftkern.save(model, tmp_path)
    perturb(model, seed=1)
    peftkern.save(model, tmp_path)
    loaded = peftkern.load(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, tokens()), logits(model, tokens()), rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "peftkern_config.json", "peftkern_model.safetensors"]


@pytest.mark.parametrize("second", ["native only", "peft only"])
def test_a_second_save_of_one_format_removes_the_other_formats_older_files(tmp_path, second, caplog):
    """save writes both formats; a later save of one format alone must not leave the other's older
    adapter beside it, which its loader (PEFT, or peftkern.load) would read without a word (a review's
    finding: logits off by 1.2)."""
    from peftkern import native_format, peft_format
    assert set(peft_format.NATIVE_NAMES) == {native_format.WEIGHTS_NAME, native_format.CONFIG_NAME}
    base, model = patched("llama", "lm", "lora")
    peftkern.save(model, tmp_path)
    perturb(model, seed=7)
    with caplog.at_level("WARNING", logger="peftkern"):
        if second == "native only":
            peftkern.save(model, tmp_path, peft=False)
        else:
            peftkern.export_peft(model, tmp_path)
    gone = ("adapter_config.json", "adapter_model.safetensors") if second == "native only" else \
        ("peftkern_config.json", "peftkern_model.safetensors")
    assert not any((tmp_path / n).exists() for n in gone) and "removed" in caplog.text
    loader = peftkern.load if second == "native only" else peftkern.load_peft
    ids = tokens()
    torch.testing.assert_close(logits(loader(copy.deepcopy(base), tmp_path), ids), logits(model, ids), rtol=0, atol=1e-5)
