"""export_peft writes a standard PEFT LoRA adapter: PeftModel.from_pretrained gives the same logits.

For every registered method, on a tiny Llama (causal LM, GQA), a tiny BERT for
sequence classification (head in modules_to_save) and GPT-2 (Conv1D, fan_in_fan_out).
"""
import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkern  # noqa: E402
from peftkern import peft_format  # noqa: E402
from tests.helpers.adapters import options_for, perturb  # noqa: E402
from tests.helpers.models import tiny_model, tokens  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
CASES = [("llama", "lm"), ("bert", "cls"), ("gpt2", "cls")]


def export_and_reload(tmp_path, method, family, head, **opts):
    base = tiny_model(family, head)
    model = peftkern.patch(copy.deepcopy(base), method, rank=4, **options_for(method), **opts)
    perturb(model)
    model.eval()
    peftkern.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    return base, model, theirs


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family,head", CASES)
@pytest.mark.parametrize("method", peftkern.methods())
def test_peft_loads_the_export_with_equal_logits(tmp_path, method, family, head):
    base, ours, theirs = export_and_reload(tmp_path, method, family, head)
    ids = tokens()
    want = logits(ours, ids)
    assert not torch.allclose(want, logits(base, ids), atol=1e-4), "the adapter must change the output"
    torch.testing.assert_close(logits(theirs, ids), want, **TOL)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    plan = ours.peftkern.plan
    raw = all(ours.peftkern.factors(s.index).u is None and ours.peftkern.factors(s.index).v is None
              for s in plan.slots)  # no u/v: A and B as they are, with the real alpha; else folded, alpha = r
    assert cfg["peft_type"] == "LORA" and cfg["r"] == plan.rank
    assert cfg["lora_alpha"] == (plan.alpha if raw else plan.rank)
    # PEFT's plain names where they match exactly the adapted modules (every default target does)
    assert cfg["target_modules"] == sorted({s.path.rpartition(".")[2] for s in plan.slots})
    assert cfg["fan_in_fan_out"] == (family == "gpt2")
    if head == "cls":
        assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score" if family == "gpt2" else "classifier"]


@pytest.mark.parametrize("method,opts", [("tied_lora", {"joint": True}), ("tied_lora", {"tie": "A", "train": "ABuv"}),
                                         ("lora", {"train": "B"}), ("pg_pos", {"generate": "AB"}),
                                         ("pg_fixed", {"generate": "B", "other": "frozen"})])
def test_slices_of_shared_and_generated_factors(tmp_path, method, opts):
    """Joint QKV and tied factors export each module's slice; PG exports the generated factors."""
    if method not in peftkern.methods():
        pytest.skip(f"{method} is not registered")
    _, ours, theirs = export_and_reload(tmp_path, method, "llama", "lm", **opts)
    torch.testing.assert_close(logits(theirs, tokens()), logits(ours, tokens()), **TOL)


def test_keys_and_shapes_are_peft_lora(tmp_path):
    from safetensors.torch import load_file

    _, ours, _ = export_and_reload(tmp_path, "vera", "bert", "cls")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    state = ours.peftkern
    for slot in state.plan.slots:
        a = tensors[f"base_model.model.{slot.path}.lora_A.weight"]
        b = tensors[f"base_model.model.{slot.path}.lora_B.weight"]
        assert a.shape == (4, slot.in_features) and b.shape == (slot.out_features, 4)
        torch.testing.assert_close(b @ a, state.delta_weight(slot.index), **TOL)  # scaling 1: ΔW = B·A
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(tensors)


def test_pruned_components_are_dropped_with_a_rank_pattern(tmp_path, monkeypatch):
    """A method reporting a smaller effective rank exports only its components with u ≠ 0."""
    base = tiny_model("bert", "cls")
    model = peftkern.patch(copy.deepcopy(base), "tied_lora", rank=4, tie="", train="ABuv")
    perturb(model)
    state = model.peftkern
    with torch.no_grad():
        state.groups[0].u[1:3] = 0.0  # slot 0 keeps components 0 and 3
        for g in list(state.groups)[1:]:
            g.u.zero_()  # the other slots keep nothing: they are left out (ΔW = 0)
    kept = {0: 2}
    monkeypatch.setattr(type(state), "effective_rank", lambda self, slot: kept.get(slot, 0))
    peftkern.export_peft(model.eval(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    first = state.plan.slots[0].path
    assert cfg["target_modules"] == [first]  # its plain name would match the other layers' modules too
    assert list(cfg["rank_pattern"].values()) == [2] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, tokens()), logits(model, tokens()), **TOL)


@pytest.mark.skipif("adalora" not in peftkern.methods(), reason="adalora is not registered")
def test_adalora_after_pruning(tmp_path):
    """Real AdaLoRA allocation prunes some triplets; the export keeps only the live ones."""
    from tests.helpers.training import train_steps

    base = tiny_model("llama", "lm")
    model = peftkern.patch(copy.deepcopy(base), "adalora", rank=2, total_step=8, tinit=1, tfinal=2, deltaT=1)
    with torch.no_grad():
        for p in model.peftkern.parameters():
            p.add_(0.1 * torch.randn_like(p))
    train_steps(model, steps=8, lr=1e-2)
    state = model.peftkern
    ranks = [state.effective_rank(s.index) for s in state.plan.slots]
    assert min(ranks) < state.plan.rank, "the schedule should have pruned something"
    peftkern.export_peft(model.eval(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"], "pruned modules need their own rank"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, tokens()), logits(model, tokens()), **TOL)


def test_merged_model_is_refused(tmp_path):
    model = peftkern.patch(tiny_model("llama"), "lora", rank=4)
    peftkern.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        peftkern.export_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_peft_factors_give_delta_weight():
    model = peftkern.patch(tiny_model("llama"), "vera", rank=4)
    perturb(model)
    state = model.peftkern
    for slot in state.plan.slots:
        a, b = peft_format.peft_factors(state, slot.index)
        torch.testing.assert_close(b @ a, state.delta_weight(slot.index), **TOL)


def test_provenance_is_in_the_safetensors_header_and_peft_loads_without_warnings(tmp_path, recwarn):
    """adapter_config.json holds only PEFT's keys (an unknown key makes peft warn on every load);
    the method and its options travel in the safetensors metadata."""
    from safetensors import safe_open

    export_and_reload(tmp_path, "pg_pos", "llama", "lm")
    assert not [w for w in recwarn if "Unexpected keyword" in str(w.message)]
    assert "peftkern" not in json.loads((tmp_path / "adapter_config.json").read_text())
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["peftkern"])
    assert meta["method"] == "pg_pos" and meta["form"] == "raw" and meta["version"] == peftkern.__version__
