"""torch.compile sees the adapter: no graph break in a patched model, and a compiled training step
equals the eager one (loss and every adapter gradient), for every method.

The ops are torch.library custom ops under compile (peftkern/ops/library.py), so dynamo records
one opaque node per kernel with its fake shapes; the methods' Python (PG's generation cache,
HyperAdaLoRA's state, AdaLoRA's regulariser) is traceable when compiling. ``aot_eager`` runs
AOTAutograd's forward/backward graphs without code generation (fast on 2 cores); one inductor
case checks the real compiler's stride and shape assertions.
"""
import pytest
import torch

import peftkern
from tests.helpers.models import tiny_model, tokens

METHODS = [("lora", {}), ("lora", {"dropout": 0.1}), ("lora", {"use_dora": True}), ("pg_pos", {"use_dora": True}),
           ("tied_lora", {"joint": True,
                                                                     "targets": ["q_proj", "k_proj", "v_proj"]}),
           ("vera", {}), ("pg_fixed", {}), ("pg_trainable", {}), ("pg_pos", {"generate": "AB"}),
           ("adalora", {"total_step": 10}), ("hyper_adalora", {"total_step": 10}),
           ("hyper_adalora", {"total_step": 10, "hypernet": "mlp"})]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items() if k != 'targets') or 'default'}" for m, o in METHODS]


def _model(method, options, backend):
    model = peftkern.patch(tiny_model("llama", seed=1), method, rank=4, backend=backend, **options).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.peftkern.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _step(model, compiler=None, ids=None):
    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    if compiler is not None:
        torch._dynamo.reset()
        step = torch.compile(step, backend=compiler, fullgraph=True)
    torch.manual_seed(11)  # the dropout seed
    loss = step(tokens() if ids is None else ids)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.peftkern.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_no_graph_breaks(method, options, backend):
    model = _model(method, options, backend)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(tokens())
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_compiled_step_equals_eager(method, options):
    loss, grads = _step(_model(method, options, "cpp"))
    loss_c, grads_c = _step(_model(method, options, "cpp"), "aot_eager")
    assert loss_c == pytest.approx(loss, rel=1e-5)
    assert grads_c.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("options", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_inductor_step_equals_eager(options):
    """Inductor checks every custom op output's shapes and strides against its fake (a transposed view
    failed). At 2 x 64 tokens the C++ cost model merges some modules' W0 + ΔW in eager mode, whose outputs
    the fake does not describe: the compiled op must not take that path (it crashed here)."""
    from peftkern.ops.backends import cpp

    ids = tokens(seq=64)
    v_proj = _model("lora", options, "cpp").model.layers[0].self_attn.v_proj
    assert cpp.planned_paths(ids.numel(), v_proj.out_features, v_proj.in_features, 4)[0] == "merged"
    loss, grads = _step(_model("lora", options, "cpp"), ids=ids)
    loss_c, grads_c = _step(_model("lora", options, "cpp"), "inductor", ids=ids)
    assert loss_c == pytest.approx(loss, rel=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


FRESH = """
import sys, torch, peftkern
sys.path.insert(0, {root!r})
from tests.helpers.models import tiny_model, tokens
ids = tokens()
for method, options in {methods!r}:
    model = peftkern.patch(tiny_model("llama"), method, **options).train()  # the default backend: auto
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids)
    assert explained.graph_break_count == 0, (method, [r.reason for r in explained.break_reasons])
    torch._dynamo.reset()
    loss = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, backend="aot_eager",
                         fullgraph=True)(ids)
    loss.backward()
    print("ok", method, explained.graph_count)
"""


def test_compiling_first_in_a_fresh_process_with_the_defaults_breaks_nothing():
    """The kind of peft#1199: with backend="auto" the backend used to be resolved, and said in the log,
    at the first forward; compiled first, that log call left 12 permanent graph breaks and
    fullgraph=True raised. Resolution (and its log line) now happen at patch time; every method's
    first forward is compiled here in a process that has run nothing before."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    methods = [("lora", {}), ("pg_pos", {}), ("vera", {}), ("tied_lora", {}), ("adalora", {"total_step": 10}),
               ("hyper_adalora", {"total_step": 10})]
    proc = subprocess.run([sys.executable, "-c", FRESH.format(root=root, methods=methods)], capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok")] == [m for m, _ in methods]
    assert all(line.endswith(" 1") for line in proc.stdout.splitlines() if line.startswith("ok"))


@pytest.mark.parametrize("state_update", ["fixed", "advance"])
def test_compiled_hyper_adalora_training_allocates_as_eager(state_update):
    """Several steps through HyperAdaLoRA's pruning schedule: a compiled pass keeps no generation past
    its end, and the allocation after each step regenerated from the stepped hypernetworks, so compiled
    training pruned other ranks and "advance" moved to another state (a review's finding). The
    generation is kept before the step now: the same losses and rank pattern as eager."""
    def train(compiled):
        torch._dynamo.reset()
        model = _model("hyper_adalora", {"total_step": 4, "tinit": 1, "tfinal": 1, "deltaT": 1,
                                         "state_update": state_update}, "torch")
        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss

        step = torch.compile(loss_of, backend="aot_eager") if compiled else loss_of
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        losses = []
        for _ in range(4):
            loss = step(tokens())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        return losses, peftkern.rank_pattern(model)

    eager, compiled = train(False), train(True)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4)
    assert compiled[1] == eager[1]


@pytest.mark.parametrize("method", ["hyper_adalora", "adalora", "pg_pos"])
def test_a_compiled_training_step_compiles_once_across_optimizer_steps(method):
    """HyperAdaLoRA's generation read the allocator's step, an int attribute and so a guard: every optimizer
    step recompiled, and the ninth failed under fullgraph (silently eager without it: a review's finding).
    AdaLoRA's regulariser loaded the torch backend's step op inside the first compiled forward, a guard on the
    registry's cache: one recompilation at the second step. Ten steps, fullgraph: one compilation."""
    from torch._dynamo.testing import CompileCounter

    from peftkern.ops import registry

    torch._dynamo.reset()
    options = {"total_step": 12, "tinit": 1, "tfinal": 1, "deltaT": 1} if "adalora" in method else {}
    registry._CACHE.pop("torch", None)  # as in a new process: nothing loaded before this patch
    model = _model(method, options, "cpp")  # (the torch backend is the step ops' fallback)
    counter = CompileCounter()
    step = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, backend=counter, fullgraph=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        step(tokens()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert counter.frame_count == 1


def test_hyper_adalora_with_reentrant_checkpointing_compiles_to_the_eager_gradients():
    """Reentrant checkpointing runs the forward without grad; under compile the regulariser after it reused
    that gradless generation, so the orthogonality term sent no gradient to the hypernetworks: H_P's
    gradients at 0.0004-0.02 of eager's (a review's finding)."""
    def grads(compiled):
        torch._dynamo.reset()
        model = _model("hyper_adalora", {"total_step": 10}, "torch")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        loss_of = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
        (torch.compile(loss_of, backend="aot_eager") if compiled else loss_of)(tokens()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    eager, compiled = grads(False), grads(True)
    assert eager.keys() == compiled.keys() and any("H_P" in n for n in eager)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)
