"""peftkern.patch / unpatch / merge / unmerge / explain on real transformers families."""
import copy

import pytest
import torch

import peftkern
from peftkern.layer import AdaptedLinear
from tests.helpers.models import FAMILIES, tiny_model, tokens


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_patch_train_unpatch_on_family(family):
    model = tiny_model(family)
    ids = tokens()
    before = logits(model, ids)
    originals = {n: m for n, m in model.named_modules()}
    peftkern.patch(model, "lora", rank=4, backend="torch")
    adapted = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert adapted, "nothing was patched"
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)  # B = 0: exactly the base model
    out = model(ids, labels=ids)
    out.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    peftkern.unpatch(model)
    assert not hasattr(model, "peftkern")
    for n, m in model.named_modules():
        assert originals[n] is m
    assert torch.equal(logits(model, ids), before)


def test_default_targets_per_family():
    expect = {"llama": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"}, "gpt_neox": {"query_key_value"},
              "gpt2": {"c_attn"}, "bert": {"query", "value"}}
    for family, names in expect.items():
        model = peftkern.patch(tiny_model(family), "lora", backend="torch", rank=2)
        got = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, AdaptedLinear)}
        assert got == names, family


def test_phi3s_default_target_is_its_fused_qkv_projection():
    """Phi-3 fuses q, k and v in qkv_proj: it had no default (a review's finding: the README's "Phi" row
    read as covering it); it takes the fused projection, as GPT-NeoX's query_key_value, and trains."""
    import transformers as T

    cfg = T.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, pad_token_id=0)
    model = peftkern.patch(T.Phi3ForCausalLM(cfg), "lora", rank=2)
    got = {p for p, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    assert got == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)}
    ids = torch.randint(1, 64, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.peftkern.parameters() if p.requires_grad)


def test_base_frozen_and_each_adapter_parameter_once():
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(True)
    peftkern.patch(model, "tied_lora", rank=4, tie="AB", train="Bu", backend="torch")
    state = model.peftkern
    state_ids = {id(p) for p in state.parameters()}
    all_params = list(model.parameters())
    assert len({id(p) for p in all_params}) == len(all_params)
    assert state_ids <= {id(p) for p in all_params}
    for p in all_params:
        if id(p) not in state_ids:
            assert not p.requires_grad
    assert state.A.requires_grad is False and state.B.requires_grad is True  # tied, trained as asked
    assert all(g.u.requires_grad for g in state.groups) and all(g.v is None for g in state.groups)
    peftkern.unpatch(model)
    assert model.lm_head.weight.requires_grad  # user's flags come back


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method,kw", [("lora", {}), ("vera", {}), ("tied_lora", {}),
                                       ("tied_lora", {"tie": "A", "train": "ABuv"})])
def test_merge_unmerge_round_trip(family, method, kw):
    model = tiny_model(family)
    ids = tokens()
    peftkern.patch(model, method, rank=4, backend="torch", **kw)
    with torch.no_grad():  # move every factor off its init so ΔW is not zero
        for p in model.peftkern.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = logits(model, ids)
    peftkern.merge(model)
    assert all(m.merged for m in model.modules() if isinstance(m, AdaptedLinear))
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)
    peftkern.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-6, atol=1e-6)


def test_unpatch_with_merge_folds_adapter():
    model = tiny_model("llama")
    ids = tokens()
    peftkern.patch(model, "lora", rank=4, backend="torch")
    with torch.no_grad():
        for p in model.peftkern.parameters():
            p.add_(0.1)
    adapted = logits(model, ids)
    peftkern.unpatch(model, merge=True)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_methods_listed():
    assert {"lora", "tied_lora", "vera"} <= set(peftkern.methods())


def test_patch_call_spelling_from_the_issue():
    model = tiny_model("llama")
    out = peftkern.patch(model, method="tied_lora", rank=8, targets=["q_proj", "k_proj", "v_proj"], tie="AB",
                         train="ABuv", joint=True)
    assert out is model
    rows = peftkern.explain(model).rows
    assert len(rows) == 9 and all(r["path"].startswith("joint shrink+expand") for r in rows)


@pytest.mark.parametrize("autocast", [False, True])
def test_joint_form_computes_x_a_once_per_layer(monkeypatch, autocast):
    """Under autocast too: each member casts the layer's input to a new tensor, and the group matched
    its input by identity, so every member computed its own shrink (a review's finding: 6 for 2)."""
    from peftkern.ops import functions

    calls = {"shrink": 0}
    real = functions.ShrinkFunction.apply

    def counting(*a):
        calls["shrink"] += 1
        return real(*a)

    monkeypatch.setattr(functions.ShrinkFunction, "apply", counting)
    model = tiny_model("llama")
    peftkern.patch(model, "tied_lora", rank=4, targets=["q_proj", "k_proj", "v_proj"], joint=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(tokens())
    assert calls["shrink"] == model.config.num_hidden_layers


@pytest.mark.parametrize("change", ["A in place", "optimizer step", "grad mode"])
def test_a_joint_member_called_alone_does_not_reuse_a_stale_shrink(change):
    """A member called alone (a probe, an exception between q and v) left the group holding its input's hu;
    a later call on the same input returned it after A had changed (a review's finding). The group now
    keys hu on the factors, the optimizer steps and grad mode too."""
    model = peftkern.patch(tiny_model("llama"), "tied_lora", rank=4, targets=["q_proj", "k_proj", "v_proj"],
                           joint=True)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, q.in_features)
    A = model.peftkern.factors(q.slot).A
    with torch.no_grad():
        for p in model.peftkern.parameters():  # B away from its zero init, so that A shows in the output
            p.add_(0.1)
        q(x)  # k and v not called: the group stays open
        if change == "A in place":
            A.mul_(2.0)
        elif change == "optimizer step":  # a fused step bumps no version counter: only the step count says so
            A.grad = torch.ones_like(A)
            torch.optim.SGD([A], lr=0.5).step()
    if change == "grad mode":  # hu made without grad must not serve a forward that trains A
        q(x).sum().backward()
        assert A.grad is not None  # the stale hu, made without grad, gave A none
        return
    with torch.no_grad():
        torch.testing.assert_close(q(x), q(x.clone()), rtol=0, atol=0)  # a new input object always recomputes


def test_joint_matches_separate_modules_math():
    """Joint form == per-target adapters using the shared A and each target's rows of B."""
    from peftkern.ops import reference

    model = tiny_model("llama")
    peftkern.patch(model, "lora", rank=4, targets=["q_proj", "k_proj", "v_proj"], joint=True, backend="torch")
    with torch.no_grad():
        for p in model.peftkern.parameters():
            p.normal_()
    x = torch.randn(2, 5, 32)
    for m in model.modules():
        if isinstance(m, AdaptedLinear):
            f = m.state.factors(m.slot)
            want = reference.adapter(x, m.base_weight(), m.bias, f.A, f.B, f.u, f.v, f.scale)
            torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_explain_reports_backend_and_provenance():
    model = peftkern.patch(tiny_model("llama"), "vera", rank=4)
    exp = peftkern.explain(model)
    assert len(exp.rows) == 6
    for row in exp.rows:
        assert row["backend"] in ("cpp", "torch", "triton") and row["requested"] == "auto"
        assert row["A"] == "tied, frozen" and row["u"] == "per module, trained"
    assert "backends:" in str(exp)


def test_patch_on_meta_device_counts_without_weights():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    peftkern.patch(model, "lora", rank=8)
    assert peftkern.count(model).adapter_trainable == 32 * 8 * (4096 + 4096) * 2
    assert all(p.is_meta for p in model.peftkern.parameters())
    assert "lora" in peftkern.parameter_table(model, "lora", rank=8)


def test_parameter_table_counts_the_head_and_needs_no_training_length():
    model = tiny_model("llama")  # a causal LM: its head is part of the base model's count
    table = peftkern.parameter_table(model, "adalora", rank=2)  # no total_step: a count does not need one
    total = sum(p.numel() for p in model.parameters())
    assert f"base model ({type(model).__name__}): {total:,}" in table
    assert not peftkern.factors.is_patched(model)  # the caller's model is untouched


def test_patched_model_deepcopies_and_keeps_working():
    model = peftkern.patch(tiny_model("llama"), "tied_lora", rank=4, backend="torch")
    clone = copy.deepcopy(model)
    ids = tokens()
    torch.testing.assert_close(logits(clone, ids), logits(model, ids))
    assert clone.peftkern is not model.peftkern
    layer = clone.model.layers[0].self_attn.q_proj
    assert layer.state is clone.peftkern


# --- bad input: a clear error, and the model left untouched ----------------------------------


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_untouched(model, snap):
    types, params = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, (t, rg) in params.items():
        assert torch.equal(now[n], t) and now[n].requires_grad == rg


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(method="lorra"), ValueError, ["unknown method", "lora", "tied_lora", "vera"]),
    (dict(method="lora", rank=0), ValueError, ["rank"]),
    (dict(method="lora", rank=-3), ValueError, ["rank"]),
    (dict(method="lora", rank=2.5), TypeError, ["rank"]),
    (dict(method="lora", rank=17), ValueError, ["larger than", "at most 16"]),
    (dict(method="lora", targets=["nope"]), ValueError, ["matched no", "q_proj", "down_proj"]),
    (dict(method="lora", targets=["q_proj", "nope"]), ValueError, ["'nope'"]),
    (dict(method="lora", targets="q_proj"), ValueError, ["one regex", "full path", "targets=['q_proj']"]),
    (dict(method="lora", targets="q_proj,v_proj"), ValueError, ["targets=['q_proj', 'v_proj']", "'all-linear'"]),
    (dict(method="lora", lora_dropout=0.1), TypeError, ["does not take", "lora_dropout", "valid options",
                                                        "PEFT's lora_dropout= is patch's dropout="]),
    (dict(method="lora", target_modules=["q_proj"]), TypeError, ["PEFT's target_modules= is patch's targets="]),
    (dict(method="lora", alpha=0), ValueError, ["alpha must be a real number in (0, inf)", "got 0"]),
    (dict(method="lora", alpha=-8.0), ValueError, ["alpha", "(0, inf)"]),
    (dict(method="lora", alpha=float("inf")), ValueError, ["alpha", "(0, inf)"]),
    (dict(method="lora", alpha_pattern={"q_proj": 0.0}), ValueError, ["alpha_pattern['q_proj']", "(0, inf)"]),
    (dict(method="lora", dropout=1.0), ValueError, ["dropout", "[0, 1)"]),
    (dict(method="adalora", use_rslora=True), ValueError, ["use_rslora", "lora"]),
    (dict(method="vera", rank_pattern={"q_proj": 2}), ValueError, ["rank_pattern", "lora"]),
    (dict(method="lora", rank_pattern={"nope": 2}), ValueError, ["rank_pattern", "'nope'", "matches none"]),
    (dict(method="lora", modules_to_save=["nope"]), ValueError, ["modules_to_save", "'nope'"]),
    # a module both adapted and trained in full (found by a review: a later load refused the save, and DoRA's
    # disable_adapter ran a copy taken before the magnitudes were set)
    (dict(method="lora", targets=["q_proj", "lm_head"], modules_to_save=["lm_head"], use_dora=True), ValueError,
     ["lm_head: both adapted (targets) and trained in full", "modules_to_save=[]"]),
    (dict(method="lora", targets=["q_proj"], modules_to_save=["layers.0.self_attn"]), ValueError,
     ["model.layers.0.self_attn.q_proj: both adapted"]),
    (dict(method="vera", tie="A"), TypeError, ["does not take", "d_initial"]),
    (dict(method="tied_lora", tie="C"), ValueError, ["tie", "A, B"]),
    (dict(method="lora", joint=True, targets="all-linear"), ValueError, ["share their input size", "down_proj"]),
    (dict(method="tied_lora", train="ABx"), ValueError, ["train"]),
    (dict(method="tied_lora", train=""), ValueError, ["train"]),
    (dict(method="lora", backend="cuda"), ValueError, ["backend", "auto", "triton", "cpp", "torch"]),
    # options taken by their truthiness or converted silently before (a review's findings)
    (dict(method="lora", joint="no"), TypeError, ["joint must be True or False", "'no'"]),
    (dict(method="tied_lora", joint="off"), TypeError, ["joint must be True or False"]),
    (dict(method="vera", d_initial=float("nan")), ValueError, ["d_initial must be a real number"]),
    (dict(method="vera", d_initial=float("inf")), ValueError, ["d_initial"]),
    (dict(method="vera", d_initial=0.0), ValueError, ["d_initial=0 never trains", "0.1"]),
    (dict(method="vera", d_initial="abc"), TypeError, ["d_initial must be a real number", "'abc'"]),
    (dict(method="vera", projection_prng_key=1.7), TypeError, ["projection_prng_key must be an int >= 0"]),
    (dict(method="vera", projection_prng_key="x"), TypeError, ["projection_prng_key"]),
])
def test_bad_input_raises_before_touching_model(kwargs, exc, words):
    model = tiny_model("llama")
    snap = _snapshot(model)
    with pytest.raises(exc) as info:
        peftkern.patch(model, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    _assert_untouched(model, snap)


def test_patching_twice_is_refused():
    model = peftkern.patch(tiny_model("llama"), "lora", backend="torch")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already patched"):
        peftkern.patch(model, "vera")
    _assert_untouched(model, snap)


def test_api_on_unpatched_model_is_a_clear_error():
    model = tiny_model("llama")
    for fn in (peftkern.unpatch, peftkern.merge, peftkern.unmerge, peftkern.explain, peftkern.count):
        with pytest.raises(ValueError, match="not patched"):
            fn(model)


@pytest.mark.parametrize("method", peftkern.methods())
def test_a_half_model_gets_an_fp32_adapter_that_trains_at_small_rates(method):
    """PEFT's autocast_adapter_dtype (its default): on a bf16 model the adapter's weights are fp32 and
    cast in each forward, so updates far below bf16's 2^-9 of a weight land (a review found DoRA's
    magnitudes unchanged after 5 AdamW steps at lr 2e-4 with bf16 weights); False keeps the model's dtype."""
    from peftkern.methods import registry as methods
    from tests.helpers.adapters import options_for

    dora = methods.get(method).dora
    base = tiny_model("llama").to(torch.bfloat16)
    model = peftkern.patch(copy.deepcopy(base), method, use_dora=dora, backend="torch", **options_for(method))
    assert {p.dtype for p in model.peftkern.parameters()} == {torch.float32}
    ids = tokens()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in model.peftkern.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.peftkern.parameters() if p.requires_grad], lr=2e-4)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n: float((p != before[n]).float().mean()) for n, p in model.peftkern.named_parameters() if n in before}
    assert min(changed.values()) > 0.5, changed  # in bf16 DoRA's magnitudes kept every entry
    kept = peftkern.patch(copy.deepcopy(base), method, use_dora=dora, backend="torch", autocast_adapter_dtype=False,
                          **options_for(method))
    assert {p.dtype for p in kept.peftkern.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="autocast_adapter_dtype must be True or False"):
        peftkern.patch(copy.deepcopy(base), method, autocast_adapter_dtype="yes", **options_for(method))


def test_an_encoder_decoder_model_is_adapted_in_both_stacks_or_refused_by_name():
    """T5, BART, Whisper: two stacks of blocks (encoder, decoder). A list of targets adapts both; all-linear,
    PG and joint QKV, which index one stack, are refused naming why (all-linear once adapted the encoder
    only, or on a 2+2-layer T5 the decoder's first block only)."""
    import transformers as T

    cfg = T.T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=100)
    torch.manual_seed(0)
    model = peftkern.patch(T.T5ForConditionalGeneration(cfg), "lora", rank=4)
    paths = [r["module"] for r in peftkern.explain(model).rows]
    assert len(paths) == 12 and sum(p.startswith("decoder.") for p in paths) == 8  # self- and cross-attention q, v
    for method, options, words in [("lora", {"targets": "all-linear"}, "encoder-decoder model with two"),
                                   ("pg_pos", {}, "encoder-decoder model"),
                                   ("tied_lora", {"joint": True, "targets": ["q", "k", "v"]}, "encoder-decoder")]:
        fresh = T.T5ForConditionalGeneration(cfg)
        with pytest.raises(ValueError, match=words):
            peftkern.patch(fresh, method, rank=4, **options)
        assert not hasattr(fresh, "peftkern")
