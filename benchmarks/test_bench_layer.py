"""Per-layer benchmark: one adapted projection (hidden -> hidden, the q_proj of the selected
model shape), forward + backward, side by side in one group:

    fused       the engine's fused op (cpp on the CPU, triton on CUDA)
    torch       the torch backend (hand-written autograd in ATen)
    reference   peftkern.ops.reference (plain torch, autograd)
    peft_lora   PEFT's LoRA Linear with the same A, B and scale
    base        the frozen nn.Linear alone (the floor)

Before timing, every provider's output and adapter gradients are checked against the reference.
"""
import pytest
import torch
import torch.nn.functional as F
from common import ALPHA, RANK, bench_dtype, fused_backend, rounds

from peftkern.ops import reference, registry
from peftkern.ops.functions import BoundOps


class LayerCase:
    def __init__(self, spec, device):
        g = torch.Generator().manual_seed(0)
        k = n = spec.config["hidden_size"]
        dtype = bench_dtype(device)

        def rand(*shape, std=1.0):
            return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

        self.x = rand(spec.batch, spec.seq, k).requires_grad_(True)
        self.weight, self.bias = rand(n, k, std=k ** -0.5), None
        self.A = rand(RANK, k, std=k ** -0.5).requires_grad_(True)
        self.B = rand(n, RANK, std=0.1).requires_grad_(True)  # non-zero B: the check sees the adapter
        self.scale = ALPHA / RANK
        self.grad_out = rand(spec.batch, spec.seq, n)

    def run(self, fn):
        for t in (self.x, self.A, self.B):
            t.grad = None
        y = fn(self.x)
        y.backward(self.grad_out)
        return y.detach(), [None if t.grad is None else t.grad.clone() for t in (self.x, self.A, self.B)]


def assert_close_norm(got, want, rel):
    """Relative error in norm: reductions over many tokens round differently per backend, so an
    elementwise tolerance would have to grow with the shape."""
    assert got is not None and got.shape == want.shape
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def op_provider(backend_name):
    def make(case, device):
        op = reference.adapter if backend_name == "reference" else BoundOps(registry.load(backend_name)).adapter
        return lambda x: op(x, case.weight, case.bias, case.A, case.B, None, None, case.scale)
    return make


def peft_provider(case, device):
    import peft

    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(case.weight.shape[1], case.weight.shape[0], bias=False)
    holder = holder.to(device=device, dtype=case.weight.dtype)
    model = peft.get_peft_model(holder, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"],
                                                        lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(case.weight)
        layer.lora_A["default"].weight.copy_(case.A)
        layer.lora_B["default"].weight.copy_(case.B)
    # The gradients land on PEFT's parameters: the case reads them from there.
    case.A, case.B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer


def base_provider(case, device):
    return lambda x: F.linear(x, case.weight, case.bias)


def fused_provider(case, device):
    return op_provider(fused_backend(device))(case, device)


PROVIDERS = {"fused": fused_provider, "torch": op_provider("torch"), "reference": op_provider("reference"),
             "peft_lora": peft_provider, "base": base_provider}


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_layer(benchmark, name, spec, device):
    case = LayerCase(spec, device)
    fn = PROVIDERS[name](case, device)
    y, grads = case.run(fn)
    rel = 2e-2 if case.x.dtype == torch.bfloat16 else 1e-5
    ref_y, ref_grads = case.run(op_provider("reference")(case, device))
    if name == "base":  # the floor: the reference output minus the adapter's term
        with torch.no_grad():
            y = y + case.scale * (case.x @ case.A.t()) @ case.B.t()
        grads, ref_grads = [], []
    assert_close_norm(y, ref_y, rel)
    for got, want in zip(grads, ref_grads):
        assert_close_norm(got, want, rel)
    benchmark.group = f"layer {spec.name}: {spec.config['hidden_size']}x{spec.config['hidden_size']}, " \
                      f"{spec.batch}x{spec.seq} tokens, r={RANK}, fwd+bwd"
    benchmark.extra_info.update(provider=name, model=spec.name, device=device.type)
    benchmark.pedantic(case.run, args=(fn,), rounds=max(rounds(), 5), warmup_rounds=1, iterations=1)
