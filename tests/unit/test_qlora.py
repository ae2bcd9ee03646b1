"""A 4-bit base (QLoRA: a transformers model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``).

Every method, with and without DoRA, computes on the 4-bit model what it computes on a full-precision
twin that holds the dequantized weights (logits and every adapter gradient); PEFT's LoRA and DoRA on the
same 4-bit model give the same logits and gradients; the packed weights never change and never get a
gradient; the adapter trains, checkpoints, saves and loads (ours, PEFT's, on a 4-bit or a
full-precision base); merging is refused in place and done by ``unpatch(merge=True)``; and what cannot
work raises a clear error before the model is touched.
"""
import copy
import logging

import pytest
import torch

import peftkern
from peftkern import quant
from peftkern.methods import registry as methods
from tests.helpers.adapters import options_for, perturb
from tests.helpers.models import tiny_model, tokens
from tests.helpers.quantized import assert_matches_twin, load_4bit, quantized_layers, tiny_4bit, tiny_llama_64

TOL = dict(rtol=1e-4, atol=1e-5)  # bitsandbytes' fp32 4-bit matmul vs torch's on the same dequantized weight
CASES = [(m, False, {}) for m in methods.names()] + [(m, True, {}) for m in methods.names() if methods.get(m).dora]
CASES += [("tied_lora", False, {"joint": True})]


@pytest.fixture(scope="module")
def base4(tmp_path_factory):
    return tiny_4bit(tmp_path_factory.mktemp("qlora"))


def _packed(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if quant.kind(m)}


def _pair(base4, method, use_dora=False, **extra):
    m4, twin, _ = base4
    kw = dict(rank=4, use_dora=use_dora, **options_for(method), **extra)
    q = peftkern.patch(copy.deepcopy(m4), method, **kw)
    r = peftkern.patch(copy.deepcopy(twin), method, **kw)
    perturb(q)
    r.peftkern.load_state_dict(q.peftkern.state_dict())
    return q, r


@pytest.mark.parametrize("method,use_dora,extra", CASES,
                         ids=[f"{m}{'-dora' if d else ''}{'-joint' if e else ''}" for m, d, e in CASES])
def test_every_method_on_a_4bit_base_matches_its_dequantized_twin(base4, method, use_dora, extra):
    q, r = _pair(base4, method, use_dora, **extra)
    before = _packed(q)
    assert assert_matches_twin(q, r, tokens(), TOL) > 0
    for name, m in q.named_modules():
        if quant.kind(m):
            assert m.weight.grad is None and torch.equal(m.weight, before[name]), name
    assert all("4bit base by bitsandbytes" in row["path"] for row in peftkern.explain(q).rows)


DROPOUT_CASES = [(m, True, {}) for m in methods.names() if methods.get(m).dora][:2]
# the kernels' masks come from a per-call seed, each backend its own stream: the twin runs the torch backend too
DROPOUT_CASES += [("lora", False, {"joint": True, "backend": "torch"}), ("tied_lora", False, {"joint": True, "backend": "torch"})]


@pytest.mark.parametrize("method,use_dora,extra", DROPOUT_CASES,
                         ids=[f"{m}{'-dora' if d else ''}{'-joint' if e else ''}" for m, d, e in DROPOUT_CASES])
def test_dropout_on_a_4bit_base_matches_its_twin(base4, method, use_dora, extra):
    """In training, PEFT's DoRA drops out the input of the whole scaled term, W0's product included:
    y = g⊙(W0·D(x) + ΔW·D(x)) + b + W0·(x − D(x)). The 4-bit path once scaled an undropped W0·x (its
    output then matched neither the dense path nor PEFT's); with the same seed both draw one mask.
    The joint form draws one mask for its group's shared shrink; the 4-bit path once drew one per module
    (a review's finding: q's and k's terms differed by 9.5 where they must be equal)."""
    q, r = _pair(base4, method, use_dora, dropout=0.3, **extra)
    q.train(), r.train()
    ids = tokens()
    outs = []
    for model in (q, r):
        torch.manual_seed(7)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out.logits)
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    for (name, a), (_, b) in zip(q.peftkern.named_parameters(), r.peftkern.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, **TOL, msg=name)


SETTINGS = [  # (load_4bit options, tolerance): bf16 compute rounds the base product; fp16 too
    (dict(quant_type="fp4", double_quant=False), TOL),
    (dict(quant_type="nf4", compute=torch.bfloat16), dict(rtol=2e-2, atol=2e-2)),
    (dict(quant_type="nf4", compute=torch.float16), dict(rtol=5e-3, atol=5e-3)),
]


@pytest.mark.parametrize("kw,tol", SETTINGS, ids=["fp4", "nf4-bf16", "nf4-fp16"])
@pytest.mark.parametrize("method", ["lora", "pg_pos"])
def test_fp4_and_other_compute_dtypes(tmp_path, kw, tol, method):
    m4, twin, _ = tiny_4bit(tmp_path, **kw)
    q, r = _pair((m4, twin, None), method)
    assert assert_matches_twin(q, r, tokens(), tol) > 0


@pytest.mark.parametrize("method", ["lora", "pg_pos"])
def test_8bit_layers(tmp_path, method):
    """LLM.int8 quantizes the activations too: the twin (dequantized weights, float activations) agrees
    to that rounding, not to fp32's."""
    import transformers as T

    from tests.helpers.quantized import dequantized_twin

    base = tiny_llama_64()
    base.save_pretrained(tmp_path)
    m8 = T.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=T.BitsAndBytesConfig(load_in_8bit=True),
                                                device_map="cpu")
    q, r = _pair((m8, dequantized_twin(m8, base), None), method)
    assert {m.quantized for m in q.modules() if isinstance(m, peftkern.AdaptedLinear)} == {"8bit"}
    assert assert_matches_twin(q, r, tokens(), dict(rtol=2e-2, atol=1e-2), dict(rtol=5e-2, atol=5e-3)) > 0
    with pytest.raises(ValueError) as info:  # its advice holds for 8-bit layers (it offered 4-bit's requantize)
        peftkern.merge(q)
    assert "8bit quantized base" in str(info.value) and "requantizing is offered for 4-bit layers only" in str(info.value)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_same_logits_and_gradients_as_peft_qlora(base4, use_dora):
    _assert_same_as_peft(base4[0], use_dora)


def test_8bit_dora_equals_peft_and_reads_w0_as_bitsandbytes_dequantizes_it(tmp_path):
    """An 8-bit W0 (DoRA's norms, merges) is bitsandbytes' row-wise dequantization, exactly, as PEFT
    reads it; pushing an fp16 identity through the layer rounded it to fp16 (a review's finding: DoRA's
    gradients then differed from PEFT's 8-bit DoRA by 1e-4 of their size)."""
    import transformers as T

    base = tiny_llama_64()
    base.save_pretrained(tmp_path)
    m8 = T.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=T.BitsAndBytesConfig(load_in_8bit=True),
                                                device_map="cpu")
    layer = m8.model.layers[0].self_attn.q_proj
    want = quant.bnb().functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    torch.testing.assert_close(quant.dequantized(layer), want, rtol=0, atol=0)
    _assert_same_as_peft(m8, True, dict(rtol=1e-5, atol=1e-7))


def _assert_same_as_peft(m4, use_dora, tol=TOL):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "up_proj"]
    peft = get_peft_model(copy.deepcopy(m4), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                        use_dora=use_dora))
    ours = peftkern.patch(copy.deepcopy(m4), "lora", rank=4, alpha=8, targets=targets, use_dora=use_dora)
    # PEFT's layers call the 4-bit layer's forward, whose CPU repacking at an eval-mode no-grad forward
    # (see peftkern.quant) would stop its gradients: turned off for PEFT as patching turns it off for us
    quant.keep_trainable(peft)
    modules = dict(peft.named_modules())
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        for s in ours.peftkern.plan.slots:
            layer, f = modules["base_model.model." + s.path], ours.peftkern.factors(s.index)
            f.A.copy_(layer.lora_A["default"].weight)
            f.B.copy_(layer.lora_B["default"].weight)
            if use_dora:
                ours.peftkern.dora.m[s.index].copy_(layer.lora_magnitude_vector["default"].weight)
    ids = tokens()
    a, b = peft(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, **tol)
    a.loss.backward()
    b.loss.backward()
    for s in ours.peftkern.plan.slots:
        layer, f = modules["base_model.model." + s.path], ours.peftkern.factors(s.index)
        pairs = [(layer.lora_A["default"].weight.grad, f.A.grad), (layer.lora_B["default"].weight.grad, f.B.grad)]
        if use_dora:
            pairs.append((layer.lora_magnitude_vector["default"].weight.grad, ours.peftkern.dora.m[s.index].grad))
        for want, got in pairs:
            torch.testing.assert_close(got, want, **tol)


def test_magnitudes_start_at_the_dequantized_row_norms(base4):
    m4, twin, _ = base4
    model = peftkern.patch(copy.deepcopy(m4), "lora", use_dora=True)
    q = model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(model.peftkern.dora.m[q.slot], quant.dequantized(q.base_layer).norm(dim=1))


@pytest.mark.parametrize("double_quant", [True, False])
def test_an_eval_forward_first_does_not_stop_training(tmp_path, caplog, double_quant):
    """bitsandbytes' CPU repacking at the first eval-mode no-grad forward (see peftkern.quant) must not cut the
    adapter off: a layer repacked before patching is unpacked, and patching turns the repacking off. Without
    double quantization the unpacked block scales are put back in their layout (bitsandbytes' inverse only
    does so with it): down_proj, 128 wide, spans two blocks per row."""
    m4 = tiny_4bit(tmp_path, double_quant=double_quant)[0]
    weights = {n: quant.dequantized(m) for n, m in m4.named_modules() if quant.kind(m)}
    ids = tokens()
    with torch.no_grad():  # before patching: repacks, on a CPU with AVX-512 BF16
        m4(input_ids=ids)
    repacked = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
                   for m in m4.modules() if quant.kind(m))
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        model = peftkern.patch(m4, "pg_pos", rank=4)
    assert (f"{repacked} 4-bit layers had been repacked" in caplog.text) == bool(repacked)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    # B starts at 0, so the step-1 gradient reaches B (of every layer, through the o_proj and MLP layers
    # that are not adapted) and not yet the hypernetwork generating A
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in model.peftkern.B)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    for n, m in model.named_modules():
        if quant.kind(m):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False), n
            # the repacking stored the block scales in bf16 (bitsandbytes' rounding; patching logs it)
            torch.testing.assert_close(quant.dequantized(m), weights[n.replace(".base_layer", "")], rtol=8e-3, atol=1e-6)


def test_the_trainer_trains_a_4bit_model_with_gradient_checkpointing_and_resumes(base4, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = tokens(batch=8, seq=12, seed=3)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def run(out, steps, resume=None):
        model = peftkern.patch(copy.deepcopy(base4[0]), "lora", rank=4)
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-2,
                                 gradient_checkpointing=True, save_steps=2, logging_steps=1, report_to=[],
                                 use_cpu=True, bf16=False, seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    before = _packed(base4[0])
    full, losses = run(tmp_path / "a", 6)
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[n.replace(".base_layer", "")], m.weight) for n, m in full.named_modules()
               if quant.kind(m))
    resumed, _ = run(tmp_path / "b", 6)  # the same run again, then resumed from its step-4 checkpoint
    again, _ = run(tmp_path / "b", 6, resume=str(tmp_path / "b" / "checkpoint-4"))
    for a, b in zip(resumed.peftkern.parameters(), again.peftkern.parameters()):
        torch.testing.assert_close(a, b)


def test_saved_adapter_loads_on_4bit_and_full_precision_bases(base4, tmp_path):
    from peft import PeftModel

    m4, twin, directory = base4
    model = peftkern.patch(copy.deepcopy(m4), "lora", rank=4, use_dora=True)
    perturb(model)
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    mine = peftkern.load(load_4bit(directory), tmp_path / "adapter")  # native files, on a fresh 4-bit load
    plain4 = load_4bit(directory)
    quant.keep_trainable(plain4)  # bitsandbytes' CPU repacking would cut PEFT's gradients (see above)
    theirs = PeftModel.from_pretrained(plain4, tmp_path / "adapter")  # PEFT, on 4-bit
    on_twin = PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "adapter")  # PEFT, full precision
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, **TOL)
        torch.testing.assert_close(on_twin(input_ids=ids).logits, want, **TOL)


def test_merge_is_refused_in_place_and_unpatch_merges_into_full_precision(base4, caplog):
    q, r = _pair(base4, "lora", use_dora=True)
    ids = tokens()
    with torch.no_grad():
        want = r(input_ids=ids).logits
    with pytest.raises(ValueError, match=r"quantized base .*unpatch\(model, merge=True\)"):
        peftkern.merge(q)
    assert not any(m.merged for m in q.modules() if isinstance(m, peftkern.AdaptedLinear))
    with pytest.raises(ValueError, match="requantize=True applies to unpatch"):
        peftkern.unpatch(copy.deepcopy(q), requantize=True)
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        plain = peftkern.unpatch(copy.deepcopy(q), merge=True)  # lora's default targets: q, v of 2 layers
    assert "merged 4 quantized layers into full-precision layers" in caplog.text
    layer = plain.model.layers[0].self_attn.q_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, **TOL)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        again = peftkern.unpatch(q, merge=True, requantize=True)
    assert "requantized 4 4-bit layers" in caplog.text
    assert quant.kind(again.model.layers[0].self_attn.q_proj) == "4bit"
    with torch.no_grad():  # 4-bit rounding of the merged weights: close to the trained model, not equal
        drift = (again(input_ids=ids).logits - want).abs().max()
    assert 0 < drift < 0.5


def test_only_the_4bit_layers_that_are_targets_are_adapted(base4):
    m4 = base4[0]
    model = peftkern.patch(copy.deepcopy(m4), "lora", rank=4, targets=["q_proj"])
    kinds = {n: m.quantized for n, m in model.named_modules() if isinstance(m, peftkern.AdaptedLinear)}
    assert kinds and set(kinds.values()) == {"4bit"} and all(n.endswith("q_proj") for n in kinds)
    assert len(quantized_layers(model)) == len(quantized_layers(m4))  # the rest stay 4-bit, untouched


def test_missing_bitsandbytes_is_named_with_its_install_command(base4, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    model = copy.deepcopy(base4[0])
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ImportError, match=r"peftkern\[quant\]"):
        peftkern.patch(model, "lora")
    monkeypatch.undo()
    assert peftkern.AdaptedLinear not in {type(m) for m in model.modules()}


def test_a_4bit_layer_on_a_device_bitsandbytes_cannot_run_is_refused(base4, monkeypatch):
    monkeypatch.setitem(quant.DEVICES, "4bit", ("cuda",))
    model = copy.deepcopy(base4[0])
    with pytest.raises(ValueError, match=r"bitsandbytes 4bit layer on cpu.*devices: cuda"):
        peftkern.patch(model, "lora")
    assert not any(isinstance(m, peftkern.AdaptedLinear) for m in model.modules())


def test_the_quantized_flag_for_the_trainer_comes_and_goes_with_the_adapter(base4):
    model = peftkern.patch(copy.deepcopy(base4[0]), "lora")
    assert model._hf_peft_config_loaded
    peftkern.unpatch(model)
    assert not model._hf_peft_config_loaded
    plain = peftkern.patch(tiny_model("llama"), "lora")  # not quantized: not marked
    assert not plain._hf_peft_config_loaded


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("targets", [None, "all-linear"])  # some 4-bit layers left (q, v adapted), or none
def test_a_merged_4bit_model_saves_and_loads_the_transformers_way(tmp_path, targets, compute):
    """unpatch(merge=True) of a 4-bit model: the merged Linears take the activations' dtype (the model
    is fp32 outside its 4-bit layers, whatever their compute dtype), and save_pretrained writes a
    checkpoint that from_pretrained loads with them still full precision."""
    from transformers import AutoModelForCausalLM

    m4, _, _ = tiny_4bit(tmp_path, compute=compute)
    kw = {} if targets is None else {"targets": targets}
    model = peftkern.patch(m4, "lora", rank=4, use_dora=True, **kw)
    perturb(model)
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    plain = peftkern.unpatch(model, merge=True)
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        merged = plain(input_ids=ids).logits
    tol = TOL if compute == torch.float32 else dict(rtol=0.05, atol=0.05)  # the 4-bit layers computed in bf16
    torch.testing.assert_close(merged, want, **tol)
    left = quantized_layers(plain)
    assert bool(left) == (targets is None)
    assert (getattr(plain.config, "quantization_config", None) is not None) == bool(left)
    plain.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    assert quantized_layers(again) == left
    assert type(again.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    quant.keep_trainable(again)  # as in `merged`, whose patching turned off bitsandbytes' CPU repacking (bf16 scales)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [r".*attn\.c_proj", "all-linear"])  # square; and non-square, nothing left 4-bit
def test_a_merged_4bit_gpt2_keeps_its_conv1d_layers(tmp_path, targets):
    """GPT-2's Conv1D layers, quantized by transformers into 4-bit Linears, merge back into Conv1D
    (weight [in, out]): a checkpoint of the merged model loads into GPT-2's own classes, the same."""
    import transformers as T

    torch.manual_seed(0)
    config = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=32)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    model = peftkern.patch(load_4bit(tmp_path / "base"), "lora", rank=4, targets=targets)
    perturb(model)
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    plain = peftkern.unpatch(model, merge=True)
    layer = plain.transformer.h[0].attn.c_proj
    assert type(layer).__name__ == "Conv1D" and layer.weight.shape == (64, 64)
    if targets == "all-linear":
        assert tuple(plain.transformer.h[0].attn.c_attn.weight.shape) == (64, 192)
    with torch.no_grad():
        merged = plain(input_ids=ids).logits
    torch.testing.assert_close(merged, want, **TOL)
    plain.save_pretrained(tmp_path / "merged")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    quant.keep_trainable(again)  # as in `merged`, whose patching turned off bitsandbytes' CPU repacking
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double_quant", [True, False])
def test_unpacking_a_repacked_layer_costs_only_the_bf16_rounding_of_its_scales(tmp_path, double_quant):
    """Rows with widely spread scales (as trained weights have): after bitsandbytes' CPU repacking and
    peftkern's unpacking, every row is within the bf16 rounding of its block scales (2⁻⁸ with margin);
    bitsandbytes' own inverse quantized double-quantized scales to 8 bits again (12% off on a row)."""
    base = tiny_llama_64()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in base.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(torch.exp(torch.randn(p.shape[0], 1, generator=g)))
    base.save_pretrained(tmp_path / "spread")
    m4 = load_4bit(tmp_path / "spread", double_quant=double_quant)
    before = {n: quant.dequantized(m) for n, m in m4.named_modules() if quant.kind(m)}
    with torch.no_grad():
        m4(input_ids=tokens())  # repacks, on a CPU with AVX-512 BF16
    quant.keep_trainable(m4)
    for name, module in m4.named_modules():
        if quant.kind(module):
            w = before[name]
            rows = (quant.dequantized(module) - w).norm(dim=1) / w.norm(dim=1)
            assert rows.max() < 2 ** -8, (name, float(rows.max()))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp"])
def test_modules_to_save_naming_a_quantized_module_is_refused_before_any_change(base4, name, storage):
    """A packed weight takes no gradient: patch used to fail in torch's requires_grad_ after swapping the
    targets and freezing the model (a review's finding), and, with the packed weight stored as bf16
    (bnb_4bit_quant_storage, a floating dtype), in quant.keep_trainable (a second review's)."""
    import transformers as T

    config = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=storage)
    m4 = T.AutoModelForCausalLM.from_pretrained(base4[2], quantization_config=config, device_map="cpu")
    before = {n: p.requires_grad for n, p in m4.named_parameters()}
    kinds = {n: type(m).__name__ for n, m in m4.named_modules()}
    with pytest.raises(ValueError, match=r"quantized weights cannot be trained in full.*llm_int8_skip_modules"):
        peftkern.patch(m4, "lora", targets=["v_proj"], modules_to_save=[name])
    assert not hasattr(m4, "peftkern")
    assert {n: p.requires_grad for n, p in m4.named_parameters()} == before
    assert {n: type(m).__name__ for n, m in m4.named_modules()} == kinds


def test_count_is_peft_print_trainable_parameters_on_a_4bit_base(base4):
    """A packed 4-bit weight counts the values it holds, two per byte, as PEFT counts it (a review's
    finding: the packed storage's numel was counted, 61,760 of 102,720 on this model)."""
    peft = pytest.importorskip("peft")
    ours = peftkern.patch(copy.deepcopy(base4[0]), "lora", rank=4)
    theirs = peft.get_peft_model(copy.deepcopy(base4[0]), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    c = peftkern.count(ours)
    assert (c.trainable, c.total) == theirs.get_nb_trainable_parameters()
    assert c.total == sum(p.numel() for p in base4[1].parameters()) + c.adapter_total


def test_requantize_keeps_the_quant_storage_dtype(base4, tmp_path):
    """``bnb_4bit_quant_storage`` (FSDP-QLoRA's one storage dtype) survives unpatch(merge=True, requantize=True)."""
    import transformers as T

    config = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16)
    m4 = T.AutoModelForCausalLM.from_pretrained(base4[2], quantization_config=config, device_map="cpu")
    q = peftkern.patch(m4, "lora", rank=4)
    perturb(q)
    peftkern.unpatch(q, merge=True, requantize=True)
    assert {q.get_submodule(n).weight.dtype for n in quantized_layers(q)} == {torch.bfloat16}


def _empty_4bit(quantized=True):
    """A 4-bit model as transformers builds it before loading weights: on meta, not quantized yet."""
    import transformers as T
    from accelerate import init_empty_weights
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128)
    with init_empty_weights():
        model = T.AutoModelForCausalLM.from_config(cfg)
        if not quantized:
            return model
        return replace_with_bnb_linear(model, quantization_config=T.BitsAndBytesConfig(load_in_4bit=True))


def test_an_empty_4bit_model_takes_dora_and_counts_its_values_once():
    """On a 4-bit model not quantized yet (meta), DoRA's start dequantized an empty weight and failed inside
    bitsandbytes, after the modules were swapped (a review's finding); and count() took the [N, K] values for
    packed bytes, doubling them. The weight's own values serve until it is quantized."""
    model = peftkern.patch(_empty_4bit(), "lora", use_dora=True)
    assert all(m.is_meta for m in model.peftkern.dora.m)
    dense = peftkern.patch(_empty_4bit(quantized=False), "lora", use_dora=True)
    assert peftkern.count(model) == peftkern.count(dense)  # the same values (was: 175,936 against 94,208)


def test_a_patch_that_fails_part_way_leaves_the_model_as_it_was(monkeypatch):
    """A failure after the modules were swapped (DoRA's start here) left them swapped and the state
    registered, so the model was half-patched and a second patch was refused: commit is undone now."""
    from peftkern import patching

    model = tiny_model("llama")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())

    def failing(model, state):
        raise RuntimeError("start failed")

    monkeypatch.setattr(patching, "start_magnitudes", failing)
    with pytest.raises(RuntimeError, match="start failed"):
        peftkern.patch(model, "lora", use_dora=True)
    assert not hasattr(model, "peftkern") and dict(model.named_modules()) == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    monkeypatch.undo()
    peftkern.patch(model, "lora", use_dora=True)  # patches as a fresh model
