"""Saving a patched model the transformers way loses no data (peftkern/hf.py).

save_pretrained writes the adapter alone (PEFT LoRA + native files), which PEFT, transformers'
load_adapter and peftkern.load all read back with equal logits; Trainer checkpoints are
adapter-sized and resume exactly; a merged full model saves under the original key names; a
wrong adapter is refused without touching the model.
"""
import copy
import json

import pytest
import torch
import transformers as T
from datasets import Dataset

import peftkern
from peftkern import native_format
from tests.helpers.adapters import logits, perturb
from tests.helpers.models import VOCAB, tiny_model, tokens

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-5, atol=1e-5)
FAMILIES = [("llama", "lm"), ("bert", "cls"), ("gpt2", "cls")]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "peftkern_config.json",
                 "peftkern_model.safetensors"}


def _patched(family, head, method="lora", **options):
    base = tiny_model(family, head)
    model = peftkern.patch(copy.deepcopy(base), method, rank=4, **options)
    perturb(model)
    return base, model.eval()


@pytest.mark.parametrize("family,head", FAMILIES)
def test_save_pretrained_writes_the_adapter_alone(tmp_path, family, head):
    base, model = _patched(family, head)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == ADAPTER_FILES  # no model.safetensors, no renamed base keys
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.peftkern.parameters())
    assert size < 4 * adapter_bytes + 64 * 1024 < sum(p.numel() * 4 for p in base.parameters())
    ids = tokens()
    want = logits(model, ids)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, ids), want, **TOL)
    ours = peftkern.load(copy.deepcopy(base), tmp_path).eval()
    assert ours.peftkern.plan.method == "lora"
    torch.testing.assert_close(logits(ours, ids), want, rtol=0, atol=1e-6)


def test_transformers_load_adapter_reads_it(tmp_path):
    base, model = _patched("llama", "lm")
    model.save_pretrained(tmp_path)
    plain = copy.deepcopy(base)
    plain.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(plain.eval(), tokens()), logits(model, tokens()), **TOL)


@pytest.mark.parametrize("method,options", [("pg_pos", {}), ("vera", {}), ("adalora", {"total_step": 10}),
                                            ("tied_lora", {"joint": True})])
def test_every_method_saves_as_lora_and_restores_exactly(tmp_path, method, options):
    base, model = _patched("llama", "lm", method, **options)
    model.save_pretrained(tmp_path)
    ids = tokens()
    want = logits(model, ids)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, ids), want, **TOL)
    ours = peftkern.load(copy.deepcopy(base), tmp_path).eval()
    assert ours.peftkern.plan.method == method  # the exact method (hypernetworks, SVD state) for more training
    torch.testing.assert_close(logits(ours, ids), want, rtol=0, atol=1e-6)


def test_a_merged_full_model_saves_under_the_original_keys(tmp_path):
    base, model = _patched("llama", "lm")
    ids = tokens()
    want = logits(model, ids)
    with pytest.raises(ValueError, match="unpatch"):
        peftkern.merge(model).save_pretrained(tmp_path / "refused")
    peftkern.unpatch(model, merge=True)  # already merged: the adapter stays folded in
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
    loaded, info = type(base).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(loaded.eval(), ids), want, **TOL)


def test_unpatched_model_saves_as_transformers_does(tmp_path):
    base = tiny_model("llama")
    model = peftkern.unpatch(peftkern.patch(copy.deepcopy(base), "lora"))
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path)
    loaded, info = type(base).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_wrong_adapter_is_refused_and_the_model_untouched(tmp_path):
    _, model = _patched("llama", "lm")
    model.save_pretrained(tmp_path)
    other = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    with pytest.raises(ValueError):
        peftkern.load(other, tmp_path)
    assert not hasattr(other, "peftkern")
    fresh = peftkern.patch(tiny_model("llama"), "vera", rank=4)  # patched, but another method: restore refuses
    before = {k: v.clone() for k, v in fresh.peftkern.state_dict().items()}
    with pytest.raises(ValueError, match="method"):
        native_format.restore(fresh, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in fresh.peftkern.state_dict().items())


# --- Trainer checkpoints ------------------------------------------------------------------------------

def _dataset(n=32, seq=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > VOCAB // 2).long().tolist()})


def _trainer(model, out, steps, method):
    args = T.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                               learning_rate=1e-2, logging_steps=1, save_steps=2, save_strategy="steps",
                               report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    callbacks = [peftkern.AllocatorCallback()] if method == "adalora" else []
    return T.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=callbacks)


def _fresh(method):
    options = {"total_step": "auto", "tinit": 1, "tfinal": 1} if method == "adalora" else {}
    return peftkern.patch(tiny_model("bert", "cls", seed=3), method, rank=2, **options)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_trainer_checkpoints_are_adapter_sized_and_resume_exactly(tmp_path, method):
    full = _fresh(method)
    _trainer(full, tmp_path / "full", 6, method).train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert ADAPTER_FILES <= names and "model.safetensors" not in names
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()

    resumed = _fresh(method)  # a new process would build the same freshly patched model
    trainer = _trainer(resumed, tmp_path / "full", 6, method)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 6
    for (n, a), (_, b) in zip(full.peftkern.state_dict().items(), resumed.peftkern.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(resumed.classifier.weight, full.classifier.weight, rtol=1e-5, atol=1e-6)
    if method == "adalora":
        assert resumed.peftkern.allocator.global_step == full.peftkern.allocator.global_step
        assert torch.equal(resumed.peftkern.allocator.keep, full.peftkern.allocator.keep)


def test_trainer_save_model_writes_the_adapter(tmp_path):
    model = _fresh("lora")
    trainer = _trainer(model, tmp_path / "run", 2, "lora")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert ADAPTER_FILES <= names and "model.safetensors" not in names
    cfg = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["classifier"]
