"""PEFT parity: the faults public bug reports point at, and the conventions PEFT users expect.

Tied weights under merge, the model's train/eval mode, targets="all-linear", dropout and
rsLoRA, and PEFT LoRA adapters loaded in (load_peft) and written back (export_peft).
"""
import copy
import json

import pytest
import torch
import transformers as T

import peftkern
from peftkern.ops import registry
from peftkern.patching import is_patched
from tests.helpers.adapters import logits, perturb
from tests.helpers.models import VOCAB, tiny_model, tokens

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-5, atol=1e-5)


def tied_llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    model = T.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


# --- 1. a merge into a tied weight ------------------------------------------------------------------

@pytest.mark.parametrize("what", ["merge", "unpatch_merge"])
def test_merge_into_a_tied_weight_is_refused_and_changes_nothing(what):
    model = peftkern.patch(tied_llama(), "lora", targets=["lm_head"])
    perturb(model)
    ids = torch.randint(0, 128, (2, 7))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = logits(model, ids)
    with pytest.raises(ValueError, match=r"lm_head.*model.embed_tokens.weight.*tied"):
        peftkern.merge(model) if what == "merge" else peftkern.unpatch(model, merge=True)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    torch.testing.assert_close(logits(model, ids), want, rtol=0, atol=0)
    assert peftkern.explain(model).rows[0]["merged"] is False


def test_unmerge_of_a_tied_weight_never_merged_changes_nothing():
    """A tied weight is never merged (refused above), so there is nothing to take out: a no-op, as on any
    module not merged (a review's finding: it raised, failing a call that should do nothing)."""
    model = peftkern.patch(tied_llama(), "lora", targets=["lm_head"])
    perturb(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert peftkern.unmerge(model) is model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_untied_lm_head_merges_exactly():
    """The way out the error names: untie, then merging equals the unmerged forward."""
    model = peftkern.patch(tied_llama(), "lora", targets=["lm_head"])
    perturb(model)
    head = model.lm_head.base_layer
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    embed = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 128, (2, 7))
    want = logits(model, ids)
    peftkern.merge(model)
    torch.testing.assert_close(logits(model, ids), want, **TOL)
    assert torch.equal(model.model.embed_tokens.weight, embed)


def test_export_of_a_tied_lm_head_adapter_loads_in_peft_with_equal_logits(tmp_path):
    base = tied_llama()
    model = peftkern.patch(copy.deepcopy(base), "lora", targets=["lm_head"])
    perturb(model)
    peftkern.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = torch.randint(0, 128, (2, 7))
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), **TOL)


# --- 2. the model's mode ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["pg_pos", "lora", "hyper_adalora"])
def test_new_modules_take_the_models_mode_and_follow_it(method):
    model = tiny_model("llama").eval()
    opts = {"total_step": 10} if method == "hyper_adalora" else {}
    peftkern.patch(model, method, **opts)
    new = [m for m in model.modules() if isinstance(m, peftkern.AdaptedLinear)] + list(model.peftkern.modules())
    assert new and not model.training and not any(m.training for m in new)
    model.train()
    assert all(m.training for m in new)
    model.eval()
    assert not any(m.training for m in new)


def test_patching_in_train_mode_gives_train_mode():
    model = peftkern.patch(tiny_model("llama").train(), "pg_pos")
    assert all(m.training for m in model.peftkern.modules())


# --- 3. targets="all-linear" -------------------------------------------------------------------------

@pytest.mark.parametrize("family,head,expected", [
    ("llama", "lm", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("gpt2", "lm", {"c_attn", "c_proj", "c_fc"}),
    ("bert", "cls", {"query", "key", "value", "dense"}),
])
def test_all_linear_is_every_linear_in_the_blocks_and_no_head(family, head, expected):
    model = peftkern.patch(tiny_model(family, head), "lora", targets="all-linear", rank=2)
    paths = [r["module"] for r in peftkern.explain(model).rows]
    assert {p.rsplit(".", 1)[-1] for p in paths} == expected
    layers = model.config.num_hidden_layers
    per_layer = {"llama": 7, "gpt2": 4, "bert": 6}[family]
    assert len(paths) == layers * per_layer
    assert not any(p.endswith(("lm_head", "classifier", "score")) or "pooler" in p for p in paths)


def test_all_linear_matches_peft(tmp_path):
    base = tiny_model("llama")
    ours = peftkern.patch(copy.deepcopy(base), "lora", targets="all-linear", rank=2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear"))
    peft_paths = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {r["module"] for r in peftkern.explain(ours).rows} == peft_paths


# --- 4. dropout and rsLoRA ---------------------------------------------------------------------------

def _backends():
    names = ["torch", "cpp"]
    if registry.unavailable("triton", "cpu") is None:
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", _backends())
def test_dropout_is_active_in_training_and_off_in_eval(backend):
    ids = tokens()
    with_dropout = peftkern.patch(tiny_model("llama"), "lora", dropout=0.5, backend=backend)
    perturb(with_dropout)
    without = peftkern.patch(tiny_model("llama"), "lora", backend=backend)
    without.peftkern.load_state_dict(with_dropout.peftkern.state_dict())
    torch.testing.assert_close(logits(with_dropout.eval(), ids), logits(without.eval(), ids), rtol=0, atol=1e-6)
    with_dropout.train()
    torch.manual_seed(1)
    a = logits(with_dropout, ids)
    torch.manual_seed(1)
    b = logits(with_dropout, ids)
    torch.manual_seed(2)
    c = logits(with_dropout, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the mask follows torch's seed
    assert not torch.allclose(a, c) and not torch.allclose(a, logits(without.eval(), ids))
    out = with_dropout(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in with_dropout.peftkern.parameters() if p.requires_grad)


def test_dropout_in_eval_equals_peft_with_lora_dropout(tmp_path):
    base = tiny_model("llama")
    ours = peftkern.patch(copy.deepcopy(base), "lora", dropout=0.1, rank=4)
    perturb(ours)
    peftkern.export_peft(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, tokens()), logits(ours.eval(), tokens()), **TOL)


def test_rslora_scale_and_export(tmp_path):
    base = tiny_model("llama")
    ours = peftkern.patch(copy.deepcopy(base), "lora", rank=4, alpha=8, use_rslora=True)
    assert ours.peftkern.factors(0).scale == pytest.approx(8 / 2)  # α/√r
    perturb(ours)
    peftkern.export_peft(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == 8 and cfg["r"] == 4
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, tokens()), logits(ours.eval(), tokens()), **TOL)


# --- 5. PEFT adapters in ----------------------------------------------------------------------------

def _peft_adapter(tmp_path, family="llama", head="lm", **config):
    base = tiny_model(family, head)
    config = {"r": 4, "lora_alpha": 8, **config}
    if head == "cls":
        config["task_type"] = "SEQ_CLS"
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(str(tmp_path))
    return base, theirs.eval()


CASES = [
    ("llama", "lm", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                         alpha_pattern={"v_proj": 3})),
    ("llama", "lm", dict(target_modules=["q_proj", "k_proj"], use_rslora=True, lora_dropout=0.05)),
    ("gpt2", "lm", dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    ("bert", "cls", dict(target_modules=["query", "value"])),
    # PEFT's other ways of choosing the modules (the tensors name them)
    ("llama", "lm", dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"])),
    ("llama", "lm", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")),
    # a full path in the list takes no layer filter (PEFT adapts layers.1's q_proj and layers.0's v_proj)
    ("llama", "lm", dict(target_modules=["model.layers.1.self_attn.q_proj", "v_proj"], layers_to_transform=[0])),
]


@pytest.mark.parametrize("family,head,config", CASES)
def test_load_peft_gives_peft_logits_and_exports_an_equal_adapter(tmp_path, family, head, config):
    from safetensors.torch import load_file

    base, theirs = _peft_adapter(tmp_path / "in", family, head, **config)
    ours = peftkern.load_peft(copy.deepcopy(base), tmp_path / "in").eval()
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), **TOL)
    assert all(p.requires_grad for p in ours.peftkern.parameters())  # trainable further
    peftkern.export_peft(ours, tmp_path / "out")
    original, exported = load_file(str(tmp_path / "in" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert original.keys() == exported.keys()
    for k in original:
        torch.testing.assert_close(exported[k], original[k], rtol=0, atol=0)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    torch.testing.assert_close(logits(again, ids), logits(theirs, ids), **TOL)
    for name, module in theirs.named_modules():  # the same rank and scale per module
        if isinstance(module, peft.tuners.lora.LoraLayer):
            mine = again.get_submodule(name)
            assert mine.r == module.r and mine.scaling == pytest.approx(module.scaling)


def test_a_loaded_peft_adapter_trains(tmp_path):
    from tests.helpers.training import assert_learns, train_steps

    base, _ = _peft_adapter(tmp_path, target_modules=["q_proj", "v_proj"])
    assert_learns(train_steps(peftkern.load_peft(copy.deepcopy(base), tmp_path), steps=30))


@pytest.mark.parametrize("change,words", [
    ({"use_dora": True}, ["use_dora is True", "lora_magnitude_vector"]),  # DoRA without its magnitudes
    ({"bias": "all"}, ["bias='all'"]),
    # tensors that the config's own selection leaves out (PEFT would not load them)
    ({"layers_to_transform": [0]}, ["model.layers.1.self_attn.q_proj", "leave out"]),
    ({"exclude_modules": ["q_proj"]}, ["leave out", "do not belong together"]),
    ({"megatron_config": {"tp": 2}}, ["megatron_config"]),
    ({"frobnicate": 1}, ["does not know", "frobnicate"]),
    ({"peft_type": "IA3"}, ["'IA3'", "LoRA"]),
    # inits that rewrite W0, which PEFT redoes at load and peftkern does not (a review's finding: PiSSA's
    # adapter loaded silently onto the unmodified base, logits off by 5e-3)
    ({"init_lora_weights": "pissa"}, ["init_lora_weights='pissa'", "rewrites the base", "'gaussian'"]),
    ({"init_lora_weights": "pissa_niter_4"}, ["pissa_niter_4"]),
    ({"init_lora_weights": "olora"}, ["'olora'"]),
    ({"init_lora_weights": "loftq"}, ["'loftq'"]),
    ({"init_lora_weights": "corda"}, ["'corda'"]),
    # a config whose r disagrees with the tensors (PEFT refuses at load; the scale α/r would differ)
    ({"r": 2}, ["has rank 4 but adapter_config.json gives it rank 2"]),
    ({"rank_pattern": {"q_proj": 3}}, ["has rank 4", "rank 3"]),
])
def test_load_peft_names_what_it_does_not_support_and_leaves_the_model_untouched(tmp_path, change, words):
    base, _ = _peft_adapter(tmp_path, target_modules=["q_proj"])
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(change)
    path.write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError) as info:
        peftkern.load_peft(model, tmp_path)
    for w in words:
        assert w in str(info.value)
    assert not hasattr(model, "peftkern")


def test_load_peft_refuses_a_model_without_the_modules(tmp_path):
    base, _ = _peft_adapter(tmp_path, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="does not have"):
        peftkern.load_peft(tiny_model("bert", "cls"), tmp_path)


def test_load_peft_refuses_other_shapes(tmp_path):
    _peft_adapter(tmp_path, target_modules=["q_proj"])
    other = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="shape"):
        peftkern.load_peft(other, tmp_path)
    assert not hasattr(other, "peftkern")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_load_peft_reads_an_lm_head_adapter_with_its_saved_base_weight(tmp_path, use_dora):
    """PEFT's save_embedding_layers ("auto", its default) saves an adapted lm_head's own weight beside
    its factors (``lm_head.base_layer.weight``); load_peft restores it, as PEFT does (a review found it
    refused such a file, naming a module_to_save)."""
    from safetensors.torch import load_file, save_file

    base, theirs = _peft_adapter(tmp_path, target_modules=["q_proj", "lm_head"], use_dora=use_dora)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in tensors
    tensors[key] = tensors[key] + 0.5  # a base weight that differs from the model's: loading must restore it
    save_file(tensors, str(file))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ours = peftkern.load_peft(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(ours.lm_head.base_layer.weight, tensors[key], rtol=0, atol=0)
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), **TOL)
    peftkern.export_peft(ours, tmp_path / "again")  # exported back with that weight, as PEFT's "auto" saves it
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    torch.testing.assert_close(again[key], tensors[key], rtol=0, atol=0)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again")).eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(theirs, ids), **TOL)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(file))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="lm_head.base_layer.weight"):
        peftkern.load_peft(model, tmp_path)
    assert not hasattr(model, "peftkern")


def test_load_peft_reads_a_rank_above_a_modules_width(tmp_path):
    """r above min(in, out) is legal in PEFT (wasteful, not wrong): load_peft reads such a file, where
    patch refuses the rank as a likely mistake (a review found load_peft refused PEFT's own file)."""
    base, theirs = _peft_adapter(tmp_path, target_modules=["q_proj", "v_proj"], r=100, lora_alpha=100)
    widths = [min(m.in_features, m.out_features) for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert max(widths) < 100
    ours = peftkern.load_peft(copy.deepcopy(base), tmp_path).eval()
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), **TOL)
    with pytest.raises(ValueError, match="larger than"):
        peftkern.patch(copy.deepcopy(base), "lora", rank=100, targets=["q_proj", "v_proj"])


def test_a_peft_model_is_refused_before_anything_changes():
    """patch() on get_peft_model's result would adapt PEFT's own lora_A/lora_B/base_layer Linears (all-linear)
    or freeze its adapter (other targets): refused, naming the ways back to the base model."""
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    for targets in (None, "all-linear", ["k_proj"]):
        with pytest.raises(ValueError, match=r"PEFT adapter layers.*unload\(\).*load_peft"):
            peftkern.patch(model, "lora", targets=targets)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {n: v[0] for n, v in before.items()}
    assert not is_patched(model)


def test_a_roberta_classifier_head_exports_as_peft_names_it_and_peft_loads_it(tmp_path):
    """RoBERTa's head is one module (classifier) holding two Linears: PEFT's modules_to_save names the module,
    and its loader fails (KeyError) on the parts' names, which the export once wrote."""
    torch.manual_seed(0)
    cfg = T.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)
    base = T.RobertaForSequenceClassification(cfg).eval()
    ours = peftkern.patch(copy.deepcopy(base), "lora", rank=4).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = tokens()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), **TOL)
