"""DoRA in a model (``patch(..., use_dora=True)``): PEFT 0.21's ``LoraConfig(use_dora=True)`` on the same
weights gives the same logits and every gradient (A, B, m, x) for Linear and GPT-2's Conv1D; the adapter
saves as a PEFT DoRA adapter that PEFT and transformers load exactly, and ``load_peft`` reads one;
merge and unmerge are exact; tied_lora, vera and the PG methods take it too; bad input is refused."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftkern
from peftkern.ops.functions import DORA_INPLACE_ADVICE
from tests.helpers.models import tiny_model, tokens

FAMILIES = [("llama", ["q_proj", "v_proj"], False), ("gpt2", ["c_attn"], True)]


def _pair(family, targets, fifo, backend="auto", dtype=torch.float64):
    base = tiny_model(family).to(dtype)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                          fan_in_fan_out=fifo))
    ours = peftkern.patch(copy.deepcopy(base), "lora", rank=4, alpha=8, targets=targets, use_dora=True,
                          backend=backend)
    modules = dict(peft.named_modules())
    with torch.no_grad():  # a trained adapter (B ≠ 0, m off its start), the same in both
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        for s in ours.peftkern.plan.slots:
            layer = modules["base_model.model." + s.path]
            f = ours.peftkern.factors(s.index)
            f.A.copy_(layer.lora_A["default"].weight)
            f.B.copy_(layer.lora_B["default"].weight)
            ours.peftkern.dora.m[s.index].copy_(layer.lora_magnitude_vector["default"].weight)
    return base, peft, ours, modules


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("family,targets,fifo", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_same_logits_and_every_gradient_as_peft(family, targets, fifo, backend):
    _, peft, ours, modules = _pair(family, targets, fifo, backend)
    ids = tokens()
    embeds = {}
    for name, model in (("peft", peft), ("ours", ours)):  # x's gradient: at the input embeddings
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, labels=ids)
        out.loss.backward()
        embeds[name] = (out.logits, emb.grad)
    torch.testing.assert_close(embeds["ours"][0], embeds["peft"][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(embeds["ours"][1], embeds["peft"][1], rtol=1e-9, atol=1e-12)
    for s in ours.peftkern.plan.slots:
        layer, f = modules["base_model.model." + s.path], ours.peftkern.factors(s.index)
        for want, got in ((layer.lora_A["default"].weight.grad, f.A.grad), (layer.lora_B["default"].weight.grad, f.B.grad),
                          (layer.lora_magnitude_vector["default"].weight.grad, ours.peftkern.dora.m[s.index].grad)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_magnitudes_start_at_the_row_norms_and_the_model_at_its_base():
    base = tiny_model("llama")
    model = peftkern.patch(copy.deepcopy(base), "lora", use_dora=True)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(model.peftkern.dora.m[q.slot], q.base_layer.weight.norm(dim=1))
    ids = tokens()
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert peftkern.count(model).adapter_trainable == sum(p.numel() for p in model.peftkern.parameters())


@pytest.mark.parametrize("family,targets,fifo", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_saved_as_a_peft_dora_adapter_that_every_loader_reads_exactly(family, targets, fifo, tmp_path):
    base, _, ours, _ = _pair(family, targets, fifo, dtype=torch.float32)
    ids = tokens()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path)
    import json

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    hf = copy.deepcopy(base)
    hf.load_adapter(str(tmp_path))
    loaded = peftkern.load_peft(copy.deepcopy(base), tmp_path).eval()
    native = peftkern.load(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        for model in (peft, hf.eval(), loaded, native):
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert loaded.peftkern.plan.use_dora and native.peftkern.plan.use_dora
    peftkern.export_peft(loaded, tmp_path / "again")  # read and written back: an equal adapter
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_peft_reads_a_dora_adapter_peft_wrote(tmp_path):
    base = tiny_model("llama")
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    peft.save_pretrained(tmp_path)
    ids = tokens()
    ours = peftkern.load_peft(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft.eval()(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("family,targets,fifo", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_merge_and_unmerge_are_exact(family, targets, fifo):
    base, _, ours, _ = _pair(family, targets, fifo)
    ids = tokens()
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        peftkern.merge(ours)
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-10, atol=1e-10)
        peftkern.unmerge(ours)
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-10, atol=1e-10)
    for n, p in ours.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-12, atol=1e-12)
    merged = peftkern.unpatch(copy.deepcopy(ours), merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method,options", [("tied_lora", {}), ("vera", {}), ("pg_pos", {}), ("pg_fixed", {}),
                                            ("lora", {"dropout": 0.1})])
def test_every_fixed_low_rank_method_trains_with_dora(method, options):
    base = tiny_model("llama")
    model = peftkern.patch(copy.deepcopy(base), method, rank=4, use_dora=True, **options).train()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(m.grad is None or torch.isfinite(m.grad).all() for m in model.peftkern.dora.m)


@pytest.mark.parametrize("method,options,error,words", [
    ("adalora", {"total_step": 10}, ValueError, "use_dora does not apply to 'adalora'"),
    ("hyper_adalora", {"total_step": 10}, ValueError, "methods it applies to: lora, pg_fixed"),
    ("lora", {"joint": True, "targets": ["q_proj", "k_proj", "v_proj"]}, ValueError, "joint=True shares one"),
    ("tied_lora", {"joint": True, "targets": ["q_proj", "k_proj", "v_proj"]}, ValueError, "joint=True shares one"),
    ("lora", {"use_dora": "yes"}, TypeError, "use_dora must be True or False"),
])
def test_bad_input_is_refused_before_the_model_changes(method, options, error, words):
    model = tiny_model("llama")
    before = [n for n, _ in model.named_modules()]
    options = {"use_dora": True, **options}
    with pytest.raises(error, match=words):
        peftkern.patch(model, method, **options)
    assert [n for n, _ in model.named_modules()] == before


def test_merging_into_a_tied_weight_is_refused():
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    model = peftkern.patch(T.LlamaForCausalLM(cfg), "lora", targets=["lm_head"], use_dora=True)
    with pytest.raises(ValueError, match="tied weights"):
        peftkern.merge(model)


class _ScaledInPlace(torch.nn.Module):
    """A projection whose output is scaled in place, as transformers' ESMFold attention does (`q /= c`)."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = self.q(x)
        y /= 4.0
        return y.square().sum()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("tokens_", [6, 40])  # the column scale, and g folded into W0 (tokens ≥ 2 × in features)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_an_output_edited_in_place_is_explained_in_doras_terms(backend, tokens_, dropout):
    """DoRA keeps its output for dm (a read of dy and y): an in-place edit after the forward fails torch's
    version check. The error says what that means and the fix, on every path (a review's finding: torch's
    bare message named neither DoRA nor the module's output); plain LoRA still allows the edit."""
    torch.manual_seed(0)
    x = torch.randn(tokens_, 16)
    lora = peftkern.patch(_ScaledInPlace(), "lora", rank=4, targets=["q"], backend=backend, dropout=dropout)
    lora(x).backward()
    dora = peftkern.patch(_ScaledInPlace(), "lora", rank=4, targets=["q"], backend=backend, dropout=dropout,
                          use_dora=True).train()
    if dropout:  # training with dropout keeps z, not y (PEFT's formula adds W0·(x − D(x)) to y): the edit is fine
        dora(x).backward()
        return
    with pytest.raises(RuntimeError, match="Most likely its output.*q = q / c") as raised:
        dora(x).backward()
    assert DORA_INPLACE_ADVICE in str(raised.value)  # the C++ node's words are Python's, whichever path ran


def test_a_module_whose_output_the_model_edits_in_place_is_refused_with_dora():
    """transformers' Falcon (parallel attention) does `mlp_output += attention_output` on dense_4h_to_h's output,
    which DoRA keeps for its backward: refused at patch, naming the module and the edit; the others train."""
    import transformers as T

    cfg = T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100, parallel_attn=True)
    model = T.FalconForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"dense_4h_to_h in place \(mlp_output \+= attention_output\)"):
        peftkern.patch(model, "lora", targets="all-linear", use_dora=True)
    assert not hasattr(model, "peftkern")
    peftkern.patch(model, "lora", targets=["query_key_value", "dense", "dense_h_to_4h"], use_dora=True)
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.grad is not None for m in model.peftkern.dora.m)
