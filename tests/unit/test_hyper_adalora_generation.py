"""hyper_adalora: generation starts at the state, gradients reach Φ only, one batched core call per
kind per forward (one hypernet-op launch for the mlp core), eval caching, and the state advance."""
import copy
import dataclasses

import pytest
import torch

import peftkern
from peftkern.hypernets.state_update import StateUpdateNet
from peftkern.ops import registry
from tests.helpers.models import tiny_model, tokens

KINDS = ["attention", "mlp", "cnn"]


def _patched(kind="attention", **kw):
    opts = dict(total_step=20, tinit=2, tfinal=4, hypernet=kind, backend="torch")
    opts.update(kw)
    return peftkern.patch(tiny_model("llama"), "hyper_adalora", rank=2, **opts)


def _nets(state):
    return {"P": state.H_P, "lam": state.H_lam, "Q": state.H_Q}


def _count_core_calls(state):
    calls = {k: 0 for k in _nets(state)}
    for name, net in _nets(state).items():
        def hook(module, args, output, name=name):
            calls[name] += 1
        net.core.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_generation_starts_at_the_state(kind):
    state = _patched(kind).peftkern
    S_P, S_Q, S_lam = state.state_P.tensors(), state.state_Q.tensors(), state.state_lam.tensors()[0]
    # llama q_proj 32->32 and v_proj 32->16 (GQA): two P lengths, one Q length
    assert [t.shape[-1] for t in S_P] == [32, 16] and [t.shape[-1] for t in S_Q] == [32]
    q_slots = [s.index for s in state.plan.slots if s.name == "q_proj"]
    with torch.no_grad():
        for j, slot in enumerate(q_slots):
            f = state.factors(slot)
            assert torch.equal(f.B, S_P[0][j].t()) and torch.equal(f.A, S_Q[0][slot])
            assert torch.equal(f.u, S_lam[slot, :, 0]) and f.v is None
            assert f.B.is_contiguous() and f.B.shape == (32, 3) and f.A.shape == (3, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_hypernetworks_only(kind):
    model = _patched(kind)
    state = model.peftkern
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    phi = {id(p) for p in state.parameters()}
    assert phi and all(p.requires_grad for p in state.parameters())
    for n, p in model.named_parameters():
        if id(p) not in phi:
            assert p.grad is None and not p.requires_grad, n
    for net in _nets(state).values():  # the zero-initialised output projections get the first gradient
        assert all(lin.weight.grad.abs().sum() > 0 for lin in net.out)
    for buf in state.buffers():
        assert not buf.requires_grad and buf.grad is None
    # one step later the gradient flows through the whole hypernetwork
    torch.optim.AdamW(state.parameters(), lr=1e-2).step()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for net in _nets(state).values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_one_batched_core_call_per_kind_per_forward(kind):
    model = _patched(kind)
    calls = _count_core_calls(model.peftkern)
    ids = tokens()
    model.train()
    for n in (1, 2):
        model(input_ids=ids, labels=ids)  # 6 adapted modules, one generation
        assert calls == {"P": n, "lam": n, "Q": n}


def test_mlp_core_runs_through_the_adapter_backends_hypernet_op(monkeypatch):
    model = _patched("mlp")
    state = model.peftkern
    seen = []
    backend = state.backends.get("cpu")
    real = backend.hypernet_forward

    def counting(E, *rest):
        seen.append(tuple(E.shape))
        return real(E, *rest)

    # the registry's decision for the adapter, with its hypernet kernel counting calls
    counted = dataclasses.replace(backend, hypernet_forward=counting)
    monkeypatch.setitem(state.backends._cache, ("cpu", None, True), (counted, ""))
    ids = tokens()
    model(input_ids=ids, labels=ids)
    slots, r = len(state.plan.slots), state.plan.rank
    assert seen == [(slots * r, 32)] * 3  # every token of every slot in one launch per kind


def test_eval_forwards_reuse_the_generation_until_parameters_change():
    model = _patched("attention").eval()
    calls = _count_core_calls(model.peftkern)
    ids = tokens()
    with torch.no_grad():
        first = model(input_ids=ids).logits
        second = model(input_ids=ids).logits
    assert calls["P"] == 1 and torch.equal(first, second)
    with torch.no_grad():
        model.peftkern.H_P.out[0].weight.normal_()  # a parameter changed: regenerate
        third = model(input_ids=ids).logits
    assert calls["P"] == 2 and not torch.equal(third, first)
    model(input_ids=ids)  # grad enabled: always a fresh generation with a graph
    assert calls["P"] == 3


def _per_slot(groups, members, slots):
    out = [None] * slots
    for G, who in zip(groups, members):
        for i, t in zip(who, G.unbind(0)):
            out[i] = t
    return out


@pytest.mark.parametrize("bound", [1e6, 1e-3])
def test_state_advances_to_the_generated_factors_after_each_step(bound):
    """Eq. (4) with the bounded state: after each step S holds G's components at unit norm, with the
    norms moved into Λ, so P·diag(Λ)·Q is G's product wherever |Λ| stays under state_bound."""
    model = _patched("mlp", state_update="advance", state_bound=bound)
    state = model.peftkern
    slots = len(state.plan.slots)
    opt = torch.optim.AdamW(state.parameters(), lr=1e-2)
    ids = tokens()
    clamped = []
    for step in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        gen = state._pass.value
        P = _per_slot([g.detach().clone() for g in gen.P], state._p_members, slots)  # [r, out] per slot
        Q = _per_slot([g.detach().clone() for g in gen.Q], state._q_members, slots)  # [r, in] per slot
        lam = gen.lam.detach().masked_fill(~state.allocator.keep, 0).clone()
        opt.step()  # the hook prunes (on schedule) and advances
        opt.zero_grad()
        keep = state.allocator.keep
        lam = lam.masked_fill(~keep, 0)  # this step's pruning applies to the advanced state too
        sP = _per_slot(state.state_P.tensors(), state._p_members, slots)
        sQ = _per_slot(state.state_Q.tensors(), state._q_members, slots)
        s_lam = state.state_lam.tensors()[0][..., 0]
        assert s_lam.abs().max() <= bound
        for i in range(slots):
            for S, G in ((sP[i], P[i]), (sQ[i], Q[i])):
                torch.testing.assert_close(S.norm(dim=-1), torch.ones(S.shape[0]))
                torch.testing.assert_close(S * G.norm(dim=-1, keepdim=True), G)  # same direction
            under = (lam[i] * P[i].norm(dim=-1) * Q[i].norm(dim=-1)).abs() < bound
            want = P[i].T @ torch.diag(lam[i] * under) @ Q[i]
            got = sP[i].T @ torch.diag(s_lam[i] * under) @ sQ[i]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        clamped.append(bool((s_lam.abs() == bound).any()))
    assert state.allocator.global_step == 3
    assert any(clamped) == (bound < 1)  # the small bound really clamps; the large one never does


def test_fixed_state_never_moves():
    model = _patched("cnn", state_update="fixed")
    state = model.peftkern
    before = [b.clone() for b in state.state_P.tensors() + state.state_Q.tensors() + state.state_lam.tensors()]
    opt = torch.optim.AdamW(state.parameters(), lr=1e-2)
    ids = tokens()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = state.state_P.tensors() + state.state_Q.tensors() + state.state_lam.tensors()
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert state.describe_slot(0)["state"] == "fixed" and state.describe_slot(0)["A"] == "Q: generated (cnn hypernet)"


def test_regulariser_is_eq7_on_the_generated_factors():
    model = _patched("attention", orth_reg_weight=0.1)
    state = model.peftkern
    ids = tokens()
    out = model(input_ids=ids, labels=ids)
    reg = torch.stack([
        ((state.factors(s.index).B.t() @ state.factors(s.index).B - torch.eye(3)) ** 2).sum()
        + ((state.factors(s.index).A @ state.factors(s.index).A.t() - torch.eye(3)) ** 2).sum()
        for s in state.plan.slots]).mean() * 0.1
    torch.testing.assert_close(peftkern.orthogonal_regularization(model), reg)
    v = out.logits.shape[-1]
    task = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task + reg)


def test_state_update_net_batches_lengths_through_one_core():
    net = StateUpdateNet([5, 3], core="attention", hidden_dim=8, heads=2)
    calls = _count_core_calls(type("S", (), {"H_P": net, "H_lam": net, "H_Q": net})())
    states = [torch.randn(2, 4, 5), torch.randn(3, 4, 3)]
    out = net(states, registry.load("torch"))
    assert calls["P"] == 1 and [o.shape for o in out] == [s.shape for s in states]
    assert all(torch.equal(o, s) for o, s in zip(out, states))  # zero output projection: the identity
    assert net.out_scale == 1 / 8
    with pytest.raises(ValueError, match="valid choices"):
        StateUpdateNet([5], core="rnn", hidden_dim=8, heads=2)
    copy.deepcopy(net)  # copies (no process-local state that cannot be copied)
