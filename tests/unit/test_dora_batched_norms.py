"""DoRA's norms of same-shaped modules in one batched computation (``dora.weight_norms``, used by
``Magnitudes.norm`` from a model's second forward on): equal to the per-module norm in fp64 and
fp32, with and without Λu/Λv, a factor shared by every module included; in a model, the first
stale module refreshes every stale module of its shape in one call, the model's outputs and every
gradient equal those with batching off, and generated factors, copies and 4-bit bases stay per
module."""
import copy

import pytest
import torch

import peftkern
from peftkern import dora, stamps
from tests.helpers.models import tiny_model, tokens


def _modules(G, N, K, r, dtype, uv, shared_A=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    A0 = rnd(r, K)
    out = []
    for _ in range(G):
        out.append((rnd(N, K), A0 if shared_A else rnd(r, K), 0.3 * rnd(N, r), rnd(r) if uv else None,
                    rnd(N) if uv else None))
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 2e-6)])
@pytest.mark.parametrize("uv", [True, False])
@pytest.mark.parametrize("shared_A", [False, True])
def test_batched_norms_equal_the_per_module_norm(dtype, tol, uv, shared_A):
    mods = _modules(4, 37, 23, 3, dtype, uv, shared_A)
    w0_sq = torch.stack([dora.row_norms_sq(w) for w, *_ in mods])
    got = dora.weight_norms(*(list(t) for t in zip(*mods)), 0.7, w0_sq)
    want = torch.stack([dora.weight_norm(*m, 0.7) for m in mods])
    assert got.shape == (4, 37) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _trained_step(model, lr=0.05):
    """One forward/backward and an SGD step: every factor and magnitude changes in place, as in training."""
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.peftkern.parameters():
            if p.grad is not None:
                p.add_(-lr * p.grad)
                p.grad = None


def _dora_model(method="lora", **options):
    torch.manual_seed(0)
    return peftkern.patch(tiny_model("llama").double(), method, rank=4, targets=["q_proj", "k_proj", "v_proj"],
                          use_dora=True, backend="torch", **options).train()


def test_a_model_refreshes_each_shape_in_one_call_and_matches_per_module_norms(monkeypatch):
    batched = _dora_model()
    single = copy.deepcopy(batched)
    single.peftkern.dora.batch_norms = False
    for model in (batched, single):
        _trained_step(model)  # the first forward registers every module; the step makes every norm stale
    calls = []
    real = dora.weight_norms
    monkeypatch.setattr(dora, "weight_norms", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    ids = tokens()
    out_b, out_s = batched(input_ids=ids, labels=ids), single(input_ids=ids, labels=ids)
    layers = len(batched.model.layers)
    # q_proj is 32 -> 32 and k_proj, v_proj are 32 -> 16 in the tiny Llama: two shapes, k and v together
    assert sorted(calls) == [layers, 2 * layers], calls
    torch.testing.assert_close(out_b.logits, out_s.logits, rtol=1e-12, atol=1e-12)
    out_b.loss.backward()
    out_s.loss.backward()
    for (name, a), (_, b) in zip(batched.peftkern.named_parameters(), single.peftkern.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_generated_factors_and_copies_are_not_batched():
    pg = _dora_model("pg_pos")
    assert pg.peftkern.dora.batch_norms is False  # new tensors each forward: batching would compute twice
    model = _dora_model()
    _trained_step(model)
    assert len(model.peftkern.dora._sources) == len(model.peftkern.plan.slots)
    twin = copy.deepcopy(model)  # its sources are its own weights, registered again by its own forwards
    assert twin.peftkern.dora._sources == {} and twin.peftkern.dora.batch_norms


def test_no_replaced_weight_outlives_its_module():
    """The batching reads other modules' inputs through weak references to them: a weight replaced
    (load_state_dict with assign, a move, a cast) is not kept alive by the norm cache."""
    import gc
    import weakref

    model = _dora_model()
    _trained_step(model)
    base = model.model.layers[0].self_attn.q_proj.base_layer
    old = weakref.ref(base.weight)
    base.load_state_dict({k: v.detach().clone() for k, v in base.state_dict().items()}, assign=True)
    gc.collect()
    assert old() is None
    _trained_step(model)  # and the next steps read the new weight
    ids = tokens()
    single = copy.deepcopy(model)
    single.peftkern.dora.batch_norms = False
    torch.testing.assert_close(model(input_ids=ids).logits, single(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("one_module", [False, True])
def test_a_forward_under_inference_mode_does_not_break_the_next_training_step(batch, one_module):
    """A norm first computed under torch.inference_mode (Lightning's validation) is cached as a normal
    tensor, which the next training step's backward may save."""
    model = _dora_model()
    model.peftkern.dora.batch_norms = batch
    _trained_step(model)
    with torch.inference_mode():
        if one_module:
            model.model.layers[0].self_attn.q_proj(torch.randn(2, 32, dtype=torch.float64))
        else:
            model(input_ids=tokens())
    _trained_step(model)
    assert all(p.grad is None for p in model.peftkern.parameters())  # the step ran and applied its gradients


def test_g_is_cached_per_norm_m_version_and_dtype():
    """``Magnitudes.gain``: g = m / norm rounded once to the dtype asked, reused while the norm, m and
    the dtype are unchanged, formed again when m alone changes (an optimizer step on m only)."""
    (w, A, B, _, _), = _modules(1, 9, 7, 2, torch.float32, uv=False)
    mags = dora.Magnitudes([9])
    mags.initialize(0, w, A, B, None, None, 0.5)
    with torch.no_grad():
        mags.m[0].mul_(torch.linspace(0.5, 1.5, 9))
    norm, g = mags.gain(0, w, A, B, None, None, 0.5, torch.float32)
    torch.testing.assert_close(norm, dora.weight_norm(w, A, B, None, None, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(g, mags.m[0].detach() / norm, rtol=0, atol=0)
    assert mags.gain(0, w, A, B, None, None, 0.5, torch.float32)[1] is g  # cached
    _, g16 = mags.gain(0, w, A, B, None, None, 0.5, torch.bfloat16)
    assert g16.dtype == torch.bfloat16 and torch.equal(g16, (mags.m[0].detach() / norm).bfloat16())
    with torch.no_grad():
        mags.m[0].mul_(2.0)  # m changes, the factors do not: the norm stays cached, g does not
    norm2, g2 = mags.gain(0, w, A, B, None, None, 0.5, torch.float32)
    assert norm2 is norm
    torch.testing.assert_close(g2, 2.0 * g, rtol=0, atol=0)
    assert not g2.requires_grad and not norm2.requires_grad


def test_a_refresh_forms_each_shapes_g_in_one_division(monkeypatch):
    model = _dora_model()
    _trained_step(model)
    mags = model.peftkern.dora
    calls = []
    real = dora._ratio
    monkeypatch.setattr(dora, "_ratio", lambda a, b, dt: calls.append(tuple(a.shape)) or real(a, b, dt))
    model(input_ids=tokens())
    layers = len(model.model.layers)
    assert sorted(calls) == [(layers, 32), (2 * layers, 16)], calls  # q_proj's shape, then k_proj's and v_proj's
    for slot, (_, g) in mags._gains.items():
        norm = mags._norms[slot][1]
        torch.testing.assert_close(g, mags.m[slot].detach() / norm, rtol=0, atol=0)


def test_g_follows_m_changed_alone_in_a_model():
    model = _dora_model()
    _trained_step(model)
    ids = tokens()
    model(input_ids=ids)  # the norms and every g cached
    with torch.no_grad():
        for m in model.peftkern.dora.m:
            m.mul_(1.5)
    fresh = copy.deepcopy(model)  # a copy starts with no cache
    assert fresh.peftkern.dora._gains == {}
    torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("what", ["all", "m"])
def test_a_fused_optimizer_step_refreshes_norms_and_g(what):
    """torch's fused AdamW (HF Trainer's and TRL's default, ``adamw_torch_fused``) updates parameters
    without bumping their version counters: the caches count optimizer steps too."""
    model = _dora_model()
    params = list(model.peftkern.dora.m.parameters()) if what == "m" else list(model.peftkern.parameters())
    opt = torch.optim.AdamW(params, lr=0.05, fused=True)
    ids = tokens()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        version = params[0]._version
        opt.step()
        opt.zero_grad()
        assert params[0]._version == version  # the fault this guards against: no version bump
        fresh = copy.deepcopy(model)  # no cache
        torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


def test_a_cached_value_belongs_to_the_very_tensor_it_was_computed_from():
    """A stamp matches only its own tensor (or a view of it), unchanged: a new tensor on the same
    storage with the same version (a parameter replaced at a freed address) does not match."""
    t = torch.randn(4, 3)
    st = stamps.of(t, None)
    assert stamps.matches(st, (t, None))
    assert stamps.matches(stamps.of(t[1:], None), (t[1:], None))  # a new view object of the same tensor
    alias = t.detach()  # another tensor: same storage, same version counter
    assert alias.data_ptr() == t.data_ptr() and alias._version == t._version
    assert not stamps.matches(st, (alias, None))
    assert not stamps.matches(st, (t, torch.ones(1)))
    t.add_(1.0)
    assert not stamps.matches(st, (t, None))
    with torch.inference_mode():
        assert stamps.of(torch.ones(2)) is None  # no version counter: never cached


@pytest.mark.parametrize("method", ["lora", "tied_lora"])
def test_a_second_forward_without_a_step_reuses_the_norms(method, monkeypatch):
    """Gradient accumulation: no optimizer step between forwards, no recompute (tied_lora's k and v
    factors are slices of shared tensors: new view objects each forward, the same tensors)."""
    model = _dora_model(method)
    _trained_step(model)
    ids = tokens()
    model(input_ids=ids)
    calls = []
    monkeypatch.setattr(dora, "weight_norms", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(dora, "weight_norm", lambda *a, **k: calls.append(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == []


def test_inference_tensor_magnitudes_run_uncached():
    """Magnitudes read and assigned under torch.inference_mode (an evaluation-only load) keep no
    version counter: the forward runs, computing g without caching it."""
    model = _dora_model().eval()
    ids = tokens()
    want = model(input_ids=ids).logits
    with torch.inference_mode():
        state = {k: v.clone() for k, v in model.peftkern.dora.state_dict().items()}
        model.peftkern.dora.load_state_dict(state, assign=True)
        assert model.peftkern.dora.m[0].is_inference()
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["lora", "tied_lora", "vera"])
def test_a_forward_with_current_norms_asks_no_provider_and_computes_the_same(method, monkeypatch):
    """Every forward after a step's first finds its (norm, g) by a lookup (``cached_gain``), without
    building or asking ``gain``'s provider; the output is the one the provider's path gives."""
    model = _dora_model(method)
    _trained_step(model)
    ids = tokens()
    want = model(input_ids=ids).logits  # refreshes every norm and g
    asked = []
    real = dora.Magnitudes.gain
    monkeypatch.setattr(dora.Magnitudes, "gain", lambda self, *a, **k: asked.append(1) or real(self, *a, **k))
    got = model(input_ids=ids).logits
    assert asked == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        model.peftkern.dora.m[0].mul_(2.0)  # a stale g: back to the provider, for that module alone
    model(input_ids=ids)
    assert asked == [1]


def test_magnitudes_and_factors_follow_replaced_parameters():
    """The lookups read the modules' own parameter dicts: a parameter replaced by
    ``load_state_dict(assign=True)`` is the one the forward uses, in a copy too."""
    model = _dora_model("tied_lora")
    _trained_step(model)
    ids = tokens()
    model(input_ids=ids)
    state = {k: v.detach().clone() * 1.25 for k, v in model.peftkern.state_dict().items()}
    twin = copy.deepcopy(model)
    model.peftkern.load_state_dict(state, assign=True)
    twin.peftkern.load_state_dict(state)  # copied into its existing parameters
    mags = model.peftkern.dora
    assert all(mags.magnitude(s) is mags.m[s] for s in range(len(mags.m)))
    f = model.peftkern.factors(0)
    assert f.A is model.peftkern.A or f.A._base is model.peftkern.A
    torch.testing.assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-12, atol=1e-12)
    copied = copy.deepcopy(model)
    assert copied.peftkern.dora.magnitude(0) is copied.peftkern.dora.m[0]
    assert copied.peftkern.dora.magnitude(0) is not mags.m[0]


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_an_fp32_A_meets_a_half_W0_in_split_parts_to_fp32_accuracy(monkeypatch, half):
    """On a GPU (``HALF_IN_FP32_OUT``) an fp32 A (the adapter's dtype on a half model) and a bf16/fp16 W0
    meet in one GEMM of W0's dtype writing fp32, A as the sum of 3 parts of that dtype: no fp32 copy of
    W0. Emulated on the CPU (bf16/fp16 products are exact in fp32, as the GEMM's): the single and the
    batched norm equal the fp64 norm of the same W0 to fp32's accuracy, not to half precision's."""
    monkeypatch.setattr(dora, "HALF_IN_FP32_OUT", frozenset({"cpu"}))
    monkeypatch.setattr(dora, "_mm_fp32", lambda a, w: a.float() @ w.float().t())
    mods = [(w.to(half), A.float(), B.float(), None, None) for w, A, B, *_ in _modules(3, 40, 72, 5, torch.float64, False)]
    assert dora._splits(mods[0][0], mods[0][1], mods[0][1])
    want = torch.stack([dora.weight_norm(w.double(), A.double(), B.double(), None, None, 0.7) for w, A, B, _, _ in mods])
    single = torch.stack([dora.weight_norm(*m, 0.7) for m in mods])
    w0_sq = torch.stack([dora.row_norms_sq(m[0]) for m in mods])
    batched = dora.weight_norms(*(list(col) for col in zip(*mods)), 0.7, w0_sq)
    for got in (single, batched):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    # one part alone (A rounded to W0's dtype) would be off by about 2^-9 of the cross term: the test sees that
    monkeypatch.setattr(dora, "SPLIT_PARTS", 1)
    coarse = torch.stack([dora.weight_norm(*m, 0.7) for m in mods])
    assert not torch.allclose(coarse.double(), want, rtol=2e-6, atol=0)
