"""TRL on peftkern: a patched model goes to ``trl.SFTTrainer`` (no ``peft_config``) and trains with
gradient checkpointing, packing and completion-only loss; its checkpoints are the adapter alone and
resume exactly; ``save_model`` writes a PEFT adapter; every method trains (AdaLoRA's allocator
following TRL's step counter); ``DPOTrainer`` takes the policy frozen at its start as its reference
(TRL's for a PeftModel), or with ``base=True`` the adapter-disabled policy."""

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import peftkern
from tests.helpers.data import CHAT_TEMPLATE, save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers as T

    path = save_tiny_llama(tmp_path_factory.mktemp("llama") / "model")
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    return path, tokenizer


def _model(tiny, method="lora", **options):
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(tiny[0])
    return peftkern.patch(model, method, rank=4, **options)


def _model_on(tiny, base):
    """lora on the tiny model loaded in fp32 or as bitsandbytes 4-bit (nf4, fp32 compute)."""
    if base == "fp32":
        return _model(tiny)
    from tests.helpers.quantized import load_4bit

    return peftkern.patch(load_4bit(tiny[0]), "lora", rank=4)


def _chat_data(n=32):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"what is {i} plus {i}?"}],
                               "completion": [{"role": "assistant", "content": f"it is {2 * i}"}]} for i in range(n)])


def _args(out, **extra):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=2e-2, report_to=[], use_cpu=True,
                bf16=False, logging_steps=1, disable_tqdm=True, max_length=64, seed=0, save_strategy="no")
    return SFTConfig(**{**base, **extra})


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.peftkern.named_parameters()}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_trains_the_adapter_alone_with_checkpointing_and_completion_only_loss(tiny, tmp_path, packing):
    model = _model(tiny)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _adapter(model)
    args = _args(tmp_path, max_steps=8, packing=packing, activation_checkpointing=True,
                 activation_checkpointing_kwargs={"use_reentrant": False})
    trainer = SFTTrainer(model=model, args=args, train_dataset=_chat_data(), processing_class=tiny[1])
    assert trainer.args.completion_only_loss in (None, True)  # prompt-completion data: loss on the completion
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts masked out of the loss
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all(not torch.equal(before[n], p) for n, p in _adapter(model).items() if "lora" not in n)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("base", ["fp32", "4bit"])
def test_sft_checkpoints_are_the_adapter_alone_and_resume_exactly(tiny, tmp_path, base):
    """On a 4-bit base TRL casts the adapter to bf16 by ``.data`` before the Trainer resumes, which loads its
    optimizer state (cast by torch to the parameters' dtype) before ``train()`` puts the adapter's dtypes back:
    AdamW then failed on fp32 parameters with bf16 moments (a review's finding). The restore puts them back."""
    if base == "4bit":
        pytest.importorskip("bitsandbytes")
    straight = _model_on(tiny, base)
    SFTTrainer(model=straight, args=_args(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3),
               train_dataset=_chat_data(), processing_class=tiny[1]).train()
    files = {f.name for f in (tmp_path / "a" / "checkpoint-3").iterdir()}
    assert {"adapter_model.safetensors", "peftkern_model.safetensors", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # never the base weights
    resumed = _model_on(tiny, base)
    SFTTrainer(model=resumed, args=_args(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3),
               train_dataset=_chat_data(), processing_class=tiny[1]).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for (name, a), b in zip(_adapter(straight).items(), _adapter(resumed).values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_save_model_writes_an_adapter_peft_loads(tiny, tmp_path):
    import transformers as T

    model = _model(tiny)
    trainer = SFTTrainer(model=model, args=_args(tmp_path / "run", max_steps=3), train_dataset=_chat_data(),
                         processing_class=tiny[1])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.randint(5, 900, (2, 9))
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
    base = T.AutoModelForCausalLM.from_pretrained(tiny[0])
    peft = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)


METHODS = [("tied_lora", {}), ("vera", {}), ("pg_pos", {}), ("adalora", {"total_step": "auto", "tinit": 1,
                                                                         "tfinal": 1}),
           ("hyper_adalora", {"total_step": "auto", "tinit": 1, "tfinal": 1})]


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_trains_under_sft(tiny, tmp_path, method, options):
    model = _model(tiny, method, **options)
    before = _adapter(model)
    callbacks = [peftkern.AllocatorCallback()] if model.peftkern.rank_allocator() is not None else []
    trainer = SFTTrainer(model=model, args=_args(tmp_path, max_steps=6), train_dataset=_chat_data(),
                         processing_class=tiny[1], callbacks=callbacks)
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in _adapter(model).items())
    if callbacks:  # the allocator follows TRL's optimizer steps, and the schedule ran to its final budget
        allocator = model.peftkern.rank_allocator()
        assert allocator.global_step == trainer.state.global_step == 6
        assert allocator.schedule.total_step == 6


QUANT_METHODS = [("vera", {}), ("pg_fixed", {}), ("adalora", {"total_step": "auto"}),
                 ("hyper_adalora", {"total_step": "auto"})]


@pytest.mark.parametrize("method,options", QUANT_METHODS, ids=[m for m, _ in QUANT_METHODS])
def test_every_method_trains_under_sft_on_a_4bit_base(tiny, tmp_path, method, options):
    """TRL sets every trainable parameter of a quantized model to bf16 by assigning ``.data`` (QLoRA's
    advice), leaving frozen factors, hypernetwork inputs and AdaLoRA's importance in fp32: these four
    methods then failed at the first step (a review's finding). The adapter's dtypes are put back at
    ``train()``, with a warning, and the adapter trains."""
    pytest.importorskip("bitsandbytes")
    from tests.helpers.quantized import load_4bit

    model = peftkern.patch(load_4bit(tiny[0]), method, rank=4, **options)
    patched = {n: p.dtype for n, p in model.peftkern.named_parameters()}
    callbacks = [peftkern.AllocatorCallback()] if model.peftkern.rank_allocator() is not None else []
    trainer = SFTTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_chat_data(8),
                         processing_class=tiny[1], callbacks=callbacks)
    assert any(p.dtype == torch.bfloat16 for p in model.peftkern.parameters())  # TRL's cast happened
    before = _adapter(model)
    trainer.train()
    assert {n: p.dtype for n, p in model.peftkern.named_parameters()} == patched
    assert any(not torch.equal(before[n], p) for n, p in _adapter(model).items())


def _preference_data(n=16):
    return Dataset.from_list([{"prompt": f"what is {i} plus {i}?", "chosen": f" it is {2 * i}",
                               "rejected": f" it is {2 * i + 1}"} for i in range(n)])


def test_dpo_reference_pass_with_base_is_the_policy_with_its_adapter_disabled(tiny, tmp_path, monkeypatch):
    import transformers as T

    model = _model(tiny)
    with torch.no_grad():  # a trained adapter: the reference must differ from the policy
        for p in model.peftkern.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = T.AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    ref = peftkern.reference_model(model, base=True)
    assert sum(1 for _ in ref.parameters()) == 0  # no second copy of the weights
    ids = torch.randint(5, 900, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    calls = []
    real = peftkern.reference.disable_adapter

    def counting(m):
        calls.append(m)
        return real(m)

    monkeypatch.setattr(peftkern.reference, "disable_adapter", counting)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, bf16=False, logging_steps=1, disable_tqdm=True, max_length=48,
                     save_strategy="no")
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=_preference_data(),
                         processing_class=tiny[1])
    before = _adapter(model)
    trainer.train()
    assert calls and all(m is model for m in calls)  # every reference pass ran the disabled policy
    assert any(not torch.equal(before[n], p) for n, p in _adapter(model).items())
    assert all(h.get("rewards/chosen") is not None for h in trainer.state.log_history if "loss" in h)


def test_the_reference_models_methods_run_without_the_adapter_and_its_modules_are_the_policys(tiny):
    """``generate`` and ``forward`` came from the policy and ran its adapter (a review's finding); they run
    the base model now. A submodule it hands on is the policy's own, a real module (a second review: wrapped,
    they had no parameters, no indexing and no hooks)."""
    import transformers as T

    model = _model(tiny)
    with torch.no_grad():
        for p in model.peftkern.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = T.AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    model.eval()
    ref = peftkern.reference_model(model, base=True)
    ids = torch.randint(5, 900, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ref.forward(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(ids, **kw), base.generate(ids, **kw))
    assert not torch.equal(model.generate(ids, **kw), base.generate(ids, **kw))  # the policy still has its adapter
    assert ref.model is model.model and len(ref.model.layers) == 2


def test_the_reference_models_state_dict_is_its_base_model(tiny, tmp_path):
    """TRL keys its cache of precomputed reference log-probabilities on the reference model's state_dict:
    it was empty, so a DPO run on another base model reused the first one's (a review's finding)."""
    import transformers as T
    from trl.trainer.utils import hash_module

    model = _model(tiny)
    ref = peftkern.reference_model(model, base=True)
    base = T.AutoModelForCausalLM.from_pretrained(tiny[0])
    state = ref.state_dict()
    assert state.keys() == base.state_dict().keys()  # the base model's names (no base_layer level: a review's finding)
    base.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    held = torch.nn.ModuleDict({"ref": ref}).state_dict()  # inside a parent, which passes its dict down
    assert held.keys() == {f"ref.{k}" for k in state}
    before = hash_module(ref)
    with torch.no_grad():
        for p in model.peftkern.parameters():  # training the adapter leaves the reference as it was
            p.add_(1.0)
    assert hash_module(ref) == before
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.base_layer.weight.add_(1.0)  # another base model
    assert hash_module(ref) != before


def test_the_reference_models_state_dict_has_the_original_trained_heads(tiny):
    """modules_to_save keeps its originals as non-persistent copies, which the reference's state_dict left out:
    the base model could not load it, and two references differing only in their heads hashed alike in TRL
    (a review's finding). The originals now, under their names, both halves of a tied pair."""
    import transformers as T

    model = peftkern.patch(T.AutoModelForCausalLM.from_pretrained(tiny[0]), "lora", rank=4,
                           modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # training the head
    base = T.AutoModelForCausalLM.from_pretrained(tiny[0])
    state = peftkern.reference_model(model, base=True).state_dict()
    assert state.keys() == base.state_dict().keys()
    assert torch.equal(state["lm_head.weight"], base.lm_head.weight)  # the original, not the trained head
    base.load_state_dict(state)


def test_an_adapter_on_the_lm_head_is_refused_under_trls_fused_head(tiny, tmp_path):
    """TRL's fused LM head reads ``lm_head.weight`` directly: an adapter there trained not at all while the
    run looked normal (a review's finding). TRL refuses that for a PeftModel; the patched model does too."""
    model = _model(tiny, targets=["q_proj", "v_proj", "lm_head"])
    before = _adapter(model)
    trainer = SFTTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_chat_data(8),
                         processing_class=tiny[1])
    with pytest.raises(ValueError, match=r"lm_head.*never train.*modules_to_save=\['lm_head'\]"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in _adapter(model).items())
    peftkern.unpatch(model)
    assert not model._forward_pre_hooks  # unpatch takes the guard away


def test_dpo_turns_the_adapters_dropout_off(tiny, tmp_path):
    """DPOTrainer's ``disable_dropout`` (its default) sets p = 0 on every nn.Dropout of the model: the
    adapter's fused dropout rate is one (PEFT's name, lora_dropout), so the policy's log-probabilities are
    deterministic as with PEFT (a review's finding: two forwards differed by 0.45)."""
    model = _model(tiny, dropout=0.3)
    ids = torch.randint(5, 900, (2, 9))
    with torch.no_grad():  # a trained adapter (B = 0 at the start hides any dropout)
        for p in model.peftkern.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True,
                     bf16=False, disable_tqdm=True, max_length=48, save_strategy="no")
    DPOTrainer(model=model, ref_model=peftkern.reference_model(model), args=args, train_dataset=_preference_data(),
               processing_class=tiny[1])
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert model.peftkern.lora_dropout.p == 0.0


def _trained(model, scale=0.05):
    with torch.no_grad():  # what SFT leaves: an adapter (and head) away from its initialisation
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("method,options", [("lora", {}), ("lora", {"use_dora": True}), ("pg_pos", {}),
                                            ("adalora", {"total_step": 20}), ("lora", {"modules_to_save": ["lm_head"]})],
                         ids=["lora", "dora", "pg_pos", "adalora", "head"])
def test_the_default_reference_is_the_policy_frozen_when_it_was_made(tiny, method, options):
    """DPO after SFT on the same adapter: TRL's reference for a PeftModel is a frozen copy of the trained
    adapter ("ref"), and reference_model was the base model, so every reward was off from TRL+PEFT's
    (a review's finding: step-1 loss 0.678 against ln 2). The reference now equals the policy as it was at
    the call, stays so while the policy trains, and its pass between the policy's forward and backward
    leaves the policy's gradients as they were."""
    torch.manual_seed(0)
    model = _trained(_model(tiny, method, **options)).train()
    model.peftkern.lora_dropout.p = 0.0
    ids = torch.randint(5, 900, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    ref = peftkern.reference_model(model)
    assert sum(1 for _ in ref.parameters()) == 0
    # DoRA's norm of the copies is computed on its own, not in the batch of the policy's norms: rounding apart
    tol = dict(rtol=1e-6, atol=1e-6) if options.get("use_dora") else dict(rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, want, **tol)

    def grads(with_reference):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        if with_reference:
            with torch.no_grad():
                ref(input_ids=ids, labels=ids)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    alone, between = grads(False), grads(True)
    assert alone.keys() == between.keys() and alone
    assert all(torch.equal(alone[n], between[n]) for n in alone)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, want)  # the policy moved
        torch.testing.assert_close(ref(input_ids=ids).logits, want, **tol)  # its reference did not
    base_ref = peftkern.reference_model(model, base=True)
    with torch.no_grad():
        assert not torch.equal(base_ref(input_ids=ids).logits, want)


def test_dpo_without_a_ref_model_takes_the_frozen_policy_as_trl_does_for_a_peft_model(tiny, tmp_path, caplog):
    """``DPOTrainer(patched, ref_model=None)`` loaded a second, full-precision copy of the base from the
    config's path, silently (a review's finding). It takes ``reference_model(model)`` now, with a log line: at
    the first step policy and reference are one model, so the loss is ln 2, as TRL+PEFT's is."""
    import logging
    import math

    model = _trained(_model(tiny))
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, bf16=False, logging_steps=1, disable_tqdm=True, max_length=48,
                     save_strategy="no")
    with caplog.at_level(logging.INFO, logger="peftkern"):
        trainer = DPOTrainer(model=model, args=args, train_dataset=_preference_data(), processing_class=tiny[1])
    assert isinstance(trainer.ref_model, peftkern.reference.ReferenceModel) and trainer.ref_model.policy is model
    assert "DPOTrainer's reference model is the patched policy" in caplog.text
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert abs(first["loss"] - math.log(2)) < 1e-4


@pytest.mark.parametrize("state_update", ["fixed", "advance"])
def test_a_reference_pass_leaves_hyper_adaloras_pruning_and_state_to_the_policy(tiny, state_update):
    """HyperAdaLoRA prunes and advances its state after the optimizer step from the pass's generation; a
    frozen reference pass run between the policy's forward and backward (TRL's order) left its own there,
    so training pruned from the frozen values (53-57 of 57 tensors apart: a review's finding). The
    reference keeps its own pass caches now: training is the same with and without it."""
    def train(with_reference):
        torch.manual_seed(0)
        model = _model(tiny, "hyper_adalora", total_step=6, tinit=1, tfinal=1, deltaT=1,
                       state_update=state_update).train()
        ref = peftkern.reference_model(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for i in range(5):
            ids = torch.randint(5, 900, (2, 9), generator=torch.Generator().manual_seed(i))
            loss = model(input_ids=ids, labels=ids).loss
            if with_reference:
                with torch.no_grad():
                    ref(input_ids=ids, labels=ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {k: v.clone() for k, v in model.peftkern.state_dict().items()}, peftkern.rank_pattern(model)

    (alone, keep_alone), (between, keep_between) = train(False), train(True)
    assert keep_alone == keep_between
    assert all(torch.equal(alone[k], between[k]) for k in alone)


def test_a_reference_pass_keeps_its_own_dora_norms():
    """The norm cache held one entry per module, so policy and reference passes evicted each other's norms:
    36 recomputations in 5 alternating evaluations against 4 (a review's finding). None now."""
    from peftkern import dora
    from tests.helpers.models import tiny_model, tokens

    model = peftkern.patch(tiny_model("llama"), "lora", rank=4, use_dora=True, targets="all-linear").eval()
    _trained(model)
    ref = peftkern.reference_model(model)
    ids = tokens()
    with torch.no_grad():
        policy, frozen = model(input_ids=ids).logits, ref(input_ids=ids).logits
    calls = []
    gain = dora.Magnitudes.gain
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dora.Magnitudes, "gain", lambda self, *a, **k: calls.append(1) or gain(self, *a, **k))
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model(input_ids=ids).logits, policy)
                assert torch.equal(ref(input_ids=ids).logits, frozen)
    assert not calls


def test_the_frozen_reference_refuses_what_would_run_other_values(tiny):
    """Merged, it ran the live policy (0.42 from the frozen values); inside disable_adapter, the base model;
    after unpatch and patch again, the old copies under the new adapter's names (a review's finding)."""
    model = _trained(_model(tiny))
    ref = peftkern.reference_model(model)
    ids = torch.randint(5, 900, (2, 9))
    peftkern.merge(model)
    with pytest.raises(ValueError, match="merged policy"):
        ref(input_ids=ids)
    peftkern.unmerge(model)
    with peftkern.disable_adapter(model), pytest.raises(ValueError, match="inside disable_adapter"):
        ref(input_ids=ids)
    peftkern.unpatch(model)
    peftkern.patch(model, "lora", rank=8)
    with pytest.raises(ValueError, match="frozen adapter is gone"):
        ref(input_ids=ids)


def test_the_frozen_copies_keep_their_values_through_a_call_in_another_dtype(tiny):
    model = _trained(_model(tiny))
    ref = peftkern.reference_model(model)
    before = {n: v.clone() for n, v in ref.frozen.values.items()}
    model.to(torch.bfloat16)
    with torch.no_grad():
        ref(input_ids=torch.randint(5, 900, (2, 9)))
    model.to(torch.float32)
    assert all(torch.equal(before[n], v) and v.dtype == torch.float32 for n, v in ref.frozen.values.items())


def test_dpo_with_sync_ref_model_is_refused_for_a_reference_without_parameters(tiny, tmp_path):
    """TRL's sync callback zips the reference's parameters with the policy's: ours has none, and it crashed
    at the first sync (step 512 by default). Refused at construction, as TRL refuses it for a PeftModel."""
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True,
                     bf16=False, disable_tqdm=True, max_length=48, save_strategy="no", sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model=True needs a reference model with parameters of its own"):
        DPOTrainer(model=_model(tiny), args=args, train_dataset=_preference_data(), processing_class=tiny[1])


def test_the_reference_keeps_its_generation_across_calls_and_refuses_a_concurrent_policy_pass(tiny):
    """Its call nests its forward: the inner scope's exit undid the outer's, so a PG reference generated at
    every call; and a reference call while another thread ran the policy gave that thread neither model's
    logits and left the policy's pass cache marked running (a review's finding). One generation over three
    eval calls now, and a call during another thread's pass of the policy is refused."""
    import threading

    model = _trained(_model(tiny, "pg_trainable")).eval()
    ref = peftkern.reference_model(model)
    ids = torch.randint(5, 900, (2, 9))
    cache = model.peftkern.pass_caches()[-1]
    with torch.no_grad():
        first = ref(input_ids=ids).logits
        kept = ref.frozen.scopes[-1][1]["value"]
        assert kept is not None  # the reference's own generation survives its call
        for _ in range(2):
            torch.testing.assert_close(ref(input_ids=ids).logits, first, rtol=0, atol=0)
        assert ref.frozen.scopes[-1][1]["value"] is kept  # reused, not generated again
    started, release = threading.Event(), threading.Event()

    def hold(module, args, output):
        started.set()
        release.wait(10)

    handle = model.model.layers[0].register_forward_hook(hold)
    worker = threading.Thread(target=lambda: model(input_ids=ids))
    worker.start()
    started.wait(10)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="another thread is running the policy"):
            ref(input_ids=ids)
    finally:
        release.set()
        worker.join()
        handle.remove()
    assert not cache.in_pass and not cache.passes
