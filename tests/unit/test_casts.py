"""The adapter's fp32 factors on a bf16 model (peftkern.casts): a trained factor under autograd is cast
in each forward (its gradient reaches the fp32 weight); a frozen one, or any under no_grad or
inference mode, is cast once and reused until its parameter changes, an optimizer step included
(a fused one bumps no version); views of a shared parameter are cut from its one copy; copies of a
model start with no cached copies."""
import copy
import logging

import pytest
import torch

import peftkern
from peftkern.casts import Casts
from tests.helpers.models import tiny_model, tokens


def _model(method="vera", **kw):
    torch.manual_seed(0)
    model = peftkern.patch(tiny_model("llama").to(torch.bfloat16), method, backend="torch",
                           targets=["q_proj", "k_proj", "v_proj"], **kw)
    assert {p.dtype for p in model.peftkern.parameters()} == {torch.float32}
    return model


def test_a_view_is_cut_from_the_cached_copy_and_equals_its_own_cast():
    shared = torch.nn.Parameter(torch.randn(6, 10), requires_grad=False)
    casts = Casts()
    for view in (shared[:, :7], shared[2:5], shared.t()[3:]):
        got = casts.cast(view, torch.bfloat16)
        torch.testing.assert_close(got, view.to(torch.bfloat16), rtol=0, atol=0)
    assert len(casts._copies) == 1  # one copy of the whole parameter serves every view
    assert casts.cast(shared, torch.bfloat16) is casts.cast(shared, torch.bfloat16)


def test_a_trained_factor_is_cast_under_autograd_and_its_gradient_reaches_the_fp32_weight():
    w = torch.nn.Parameter(torch.randn(3, 4))
    casts = Casts()
    c = casts.cast(w, torch.bfloat16)
    assert c.grad_fn is not None and not casts._copies
    (c.float() * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(4.0).expand(3, 4))
    with torch.no_grad():  # under no_grad: cached until the parameter changes
        first = casts.cast(w, torch.bfloat16)
        assert casts.cast(w, torch.bfloat16) is first
        w.add_(1.0)
        again = casts.cast(w, torch.bfloat16)
    assert again is not first
    torch.testing.assert_close(again, w.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_frozen_projections_are_cast_once_per_model_not_per_forward():
    model = _model("vera")
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    copies = dict(model.peftkern.casts._copies)
    assert copies  # VeRA's frozen A and B
    model(input_ids=ids, labels=ids).loss.backward()
    assert {k: v[2] for k, v in model.peftkern.casts._copies.items()} == {k: v[2] for k, v in copies.items()}


def test_no_grad_forwards_reuse_copies_and_see_every_optimizer_step():
    """A fused AdamW bumps no version counter: the step count makes the copies stale. A model copy
    with an empty cache gives the same logits after each step."""
    model = _model("lora", use_dora=True)
    params = [p for p in model.peftkern.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    ids = tokens()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            got = model(input_ids=ids).logits
            n = len(model.peftkern.casts._copies)
            assert n and model(input_ids=ids).logits.equal(got) and len(model.peftkern.casts._copies) == n
        fresh = copy.deepcopy(model)
        assert fresh.peftkern.casts._copies == {}
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=ids).logits, got, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "tied_lora", "pg_pos"])
def test_generation_under_inference_mode_then_training(method):
    model = _model(method).eval()
    ids = tokens()
    with torch.inference_mode():
        model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # a cached copy made under inference mode could not be saved for this backward
    assert all(p.grad is not None for p in model.peftkern.parameters() if p.requires_grad)


def test_a_factor_frozen_again_after_a_fused_step_is_not_served_stale():
    """A copy cached while a factor was frozen must not survive a step that trained it: fused AdamW
    bumps no version counter and requires_grad is toggled freely (a review's finding)."""
    model = _model("lora")
    As = [p for n, p in model.peftkern.named_parameters() if n.endswith(".A")]
    opt = torch.optim.AdamW([p for p in model.peftkern.parameters() if p.requires_grad], lr=1e-2, fused=True)
    ids = tokens()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for p in As:
        p.requires_grad_(False)
    step()  # A frozen: its cast cached
    for p in As:
        p.requires_grad_(True)
    step()
    step()  # A trained by a fused step
    for p in As:
        p.requires_grad_(False)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = copy.deepcopy(model)(input_ids=ids).logits  # an empty cache
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [True, False])
def test_a_saved_adapter_of_a_half_model_loads_back_in_its_own_dtype(tmp_path, autocast):
    """peftkern.save / load on a bf16 model, with the fp32 adapter (the default) or the model's dtype:
    load builds the adapter the way it was saved and checks the model against the model's dtype (it
    compared the model with the adapter's fp32 and refused every bf16 model: a review's finding)."""
    model = peftkern.patch(tiny_model("llama").to(torch.bfloat16), "lora", backend="torch",
                           autocast_adapter_dtype=autocast)
    with torch.no_grad():
        for p in model.peftkern.parameters():
            p.add_(0.01 * torch.randn_like(p))
    peftkern.save(model, tmp_path)
    loaded = peftkern.load(tiny_model("llama").to(torch.bfloat16), tmp_path, backend="torch")
    want = torch.float32 if autocast else torch.bfloat16
    assert {p.dtype for p in loaded.peftkern.parameters()} == {want}
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_half_model_merges_in_fp32_and_rounds_once(use_dora):
    """merge forms W0 + ΔW (DoRA: g⊙(W0 + ΔW)) from the fp32 adapter in fp32 and rounds it to bf16
    once, as PEFT's merge_and_unload; rounding ΔW to bf16 first left a quarter of the entries one
    ulp off (a review's finding)."""
    model = _model("lora", use_dora=use_dora)
    with torch.no_grad():
        for p in model.peftkern.parameters():
            p.add_(0.05 * torch.randn_like(p))
    q = model.model.layers[0].self_attn.q_proj
    w0 = q.base_layer.weight.detach().float().clone()
    delta = model.peftkern.delta_weight(q.slot).float()
    want = w0 + delta
    if use_dora:
        want = want * (model.peftkern.dora.m[q.slot].detach().float() / want.norm(dim=1))[:, None]
    peftkern.merge(model)
    torch.testing.assert_close(q.base_layer.weight, want.to(torch.bfloat16), rtol=0, atol=0)


def test_a_parametrized_factor_is_read_through_its_parametrization():
    """torch.nn.utils.parametrize moves a factor out of its module's parameter dict: factors() then
    reads the attribute (the dict lookups raised KeyError: a review's finding)."""
    from torch.nn.utils import parametrize

    class Zero(torch.nn.Module):
        def forward(self, X):
            return 0.0 * X

    model = _model("lora")
    ids = tokens()
    group = model.peftkern.groups[0]
    parametrize.register_parametrization(group, "A", Zero())
    assert not model.peftkern.factors(0).A.any()
    model(input_ids=ids, labels=ids).loss.backward()
    assert group.parametrizations.A.original.grad is not None


def test_explain_says_the_adapters_dtype_and_the_cast():
    assert "adapter weights in float32, cast to bfloat16 in each training forward" in str(peftkern.explain(_model("lora")))
    kept = peftkern.patch(tiny_model("llama").to(torch.bfloat16), "lora", autocast_adapter_dtype=False)
    assert "adapter weights in bfloat16, the model's dtype" in str(peftkern.explain(kept))
    # read from the tensors when asked: a move with .to(dtype) takes the adapter along (a review's finding:
    # explain said what the patch had planned)
    assert "adapter weights in float64, the model's dtype" in str(peftkern.explain(_model("lora").to(torch.float64)))
    moved = peftkern.patch(tiny_model("llama"), "lora").to(torch.bfloat16)
    assert "adapter weights in bfloat16, the model's dtype" in str(peftkern.explain(moved))


@pytest.mark.parametrize("autocast", [True, False])
def test_load_peft_takes_the_adapter_dtype_choice(tmp_path, autocast):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama").to(torch.bfloat16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.save_pretrained(str(tmp_path))
    ours = peftkern.load_peft(copy.deepcopy(base), tmp_path, autocast_adapter_dtype=autocast)
    assert {p.dtype for p in ours.peftkern.parameters()} == {torch.float32 if autocast else torch.bfloat16}


def test_copies_of_replaced_parameters_are_dropped():
    """Parameters replaced over and over (load_state_dict with assign) leave no unbounded trail of copies."""
    model = _model("lora")
    ids = tokens()
    live = sum(1 for _ in model.peftkern.parameters())
    for _ in range(12):
        state = {k: v.detach().clone() for k, v in model.peftkern.state_dict().items()}
        model.peftkern.load_state_dict(state, assign=True)
        with torch.no_grad():
            model(input_ids=ids)
        assert len(model.peftkern.casts._copies) <= 2 * live + 16


# --- trained factors cast together, once per forward of the model ---------------------------------------


def _train(model, steps=3, checkpointing=None, call=None):
    """Losses and trained values after ``steps`` AdamW steps (a submodule ``call`` instead of the model)."""
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss if call is None else call(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _alone(monkeypatch):
    """Every trained factor cast on its own (the path before casts were batched)."""
    monkeypatch.setattr(Casts, "_begin", lambda self, module, args: None)


@pytest.mark.parametrize("method,kw", [("lora", {}), ("lora", {"use_dora": True}), ("vera", {}), ("tied_lora", {}),
                                       ("adalora", {"total_step": 10}), ("pg_pos", {})])
def test_trained_factors_cast_together_train_bit_for_bit_as_cast_alone(method, kw, monkeypatch):
    calls = []
    real = Casts._begin
    monkeypatch.setattr(Casts, "_begin", lambda self, *a: calls.append(1) or real(self, *a))
    batched = _train(_model(method, **kw))
    assert len(calls) == 3
    _alone(monkeypatch)
    alone = _train(_model(method, **kw))
    assert batched[0] == alone[0]
    for name, value in alone[1].items():
        assert batched[1][name].equal(value), name


def test_the_second_forward_casts_every_trained_factor_in_one_node():
    model = _model("lora", use_dora=True)
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()  # the first forward finds what is trained
    trained = [p for p in model.peftkern.parameters() if p.requires_grad and p.dim() == 2]  # A and B (m is not cast)
    assert {id(p) for p in trained} == {k[0] for k in model.peftkern.casts._trained}
    seen = {}
    real = Casts._trained_cast

    def spy(self, t, dtype):
        out = real(self, t, dtype)
        seen[id(t)] = type(out.grad_fn).__name__
        return out

    Casts._trained_cast = spy
    try:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        Casts._trained_cast = real
    assert set(seen) == {id(p) for p in trained} and set(seen.values()) == {"_CastAllBackward"}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    assert model.peftkern.casts._batch == {}  # kept for one forward only


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_the_same_with_casts_together(reentrant, monkeypatch):
    batched = _train(_model("lora"), checkpointing=reentrant)
    _alone(monkeypatch)
    alone = _train(_model("lora"), checkpointing=reentrant)
    assert batched[0] == alone[0] and all(batched[1][n].equal(v) for n, v in alone[1].items())


def test_a_submodule_called_on_its_own_casts_alone_and_the_model_then_batches(monkeypatch):
    """Only the patched model's own forward casts together: the base model inside it, called directly,
    casts each factor itself, never meets a copy of an earlier forward, and leaves nothing that would
    stop the next forwards of the model from casting together."""
    def inner(m, ids):
        return m.model(input_ids=ids).last_hidden_state.float().pow(2).mean()

    def mixed(model):
        model(input_ids=tokens(), labels=tokens()).loss.backward()
        first = _train(model, call=inner)
        return first, _train(model)

    model = _model("lora")
    batched = mixed(model)
    assert model.peftkern.casts._trained and not model.peftkern.casts._shared
    _alone(monkeypatch)
    alone = mixed(_model("lora"))
    for b, a in zip(batched, alone):
        assert b[0] == a[0] and all(b[1][n].equal(v) for n, v in a[1].items())


def test_no_casts_together_in_a_distributed_run(monkeypatch):
    from peftkern import casts, dist
    monkeypatch.setattr(dist, "initialized", lambda: True)
    model = _model("lora")
    ids = tokens()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    calls = []
    monkeypatch.setattr(casts._CastAll, "apply", lambda *a: calls.append(a))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == []


def test_a_factor_shared_by_modules_is_cast_for_each_use_not_batched():
    """Tied-LoRA's A and B serve every layer: one batched copy would sum their gradients in bf16."""
    model = _model("tied_lora")
    ids = tokens()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    shared = {id(p) for n, p in model.peftkern.named_parameters() if p.requires_grad and p.dim() == 2}
    casts = model.peftkern.casts
    assert shared and shared <= {k[0] for k in casts._shared} and not shared & {k[0] for k in casts._trained}



def test_a_factor_a_forward_does_not_use_gets_no_gradient_not_a_zero_one(monkeypatch):
    """LayerDrop, or a vision tower a text-only batch skips: the factors the last forward cast but this
    one does not use must keep grad None, as with a cast per factor (a review's finding: they got zeros,
    which AdamW then moved by weight decay and momentum)."""
    def run():
        model = _model("lora")
        skip = model.model.layers[1]
        real = type(skip).forward
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        ids, nones = tokens(), []
        for i in range(4):
            if i % 2:  # the odd steps skip layer 1, LayerDrop's way
                skip.forward = lambda hidden_states, *a, **k: hidden_states
            else:
                skip.forward = real.__get__(skip)
            model(input_ids=ids, labels=ids).loss.backward()
            nones.append(sum(p.grad is None for p in model.peftkern.parameters() if p.requires_grad))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return nones, [p.detach().clone() for p in model.peftkern.parameters()]

    batched = run()
    assert batched[0] == [0, 6, 0, 6]  # layer 1's q, k, v: A and B
    _alone(monkeypatch)
    alone = run()
    assert batched[0] == alone[0] and all(a.equal(b) for a, b in zip(batched[1], alone[1]))


def test_a_forward_that_raises_leaves_no_copies_behind():
    model = _model("lora")
    ids = tokens()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(IndexError):
        model(input_ids=ids + 10_000)  # out of the vocabulary: raises after the pre-hook ran
    casts = model.peftkern.casts
    assert not casts._open and casts._batch == {}


def test_a_cast_from_outside_is_put_back_at_train_and_a_move_is_kept(caplog):
    """TRL assigns ``.data`` of a quantized model's trainable parameters to bf16: ``train()`` puts the
    adapter's dtypes back, once with a warning (tests/integration/test_trl.py trains on it); a device move
    between (the Trainer's) does not make that cast the record, and a cast of the whole model is kept."""
    model = peftkern.patch(tiny_model("llama"), "vera")
    for p in model.peftkern.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.to("cpu")
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        model.eval()  # an evaluation before the first step (eval_on_start) puts them back too
    assert {p.dtype for p in model.peftkern.parameters()} == {torch.float32}
    assert "TRL" in caplog.text and "back in float32" in caplog.text
    for p in model.peftkern.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.train()
    assert {p.dtype for p in model.peftkern.parameters()} == {torch.float32}
    model.to(torch.bfloat16).train()
    assert {p.dtype for p in model.peftkern.parameters()} == {torch.bfloat16}
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()


def test_in_a_distributed_run_a_cast_from_outside_is_left_alone(tmp_path):
    """There a dtype change of .data replaces the parameter's gradient accumulator, which DDP's hooks hold
    (the ranks' gradients silently stopped being averaged), and FSDP2's mixed precision gathers parameters
    in the compute dtype on purpose (a review's findings)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = peftkern.patch(tiny_model("llama"), "lora")
        for p in model.peftkern.parameters():
            p.data = p.data.to(torch.bfloat16)
        model.train()
        assert {p.dtype for p in model.peftkern.parameters()} == {torch.bfloat16}
    finally:
        dist.destroy_process_group()
