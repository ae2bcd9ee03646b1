"""The backends' registry: one place decides which code runs.

backend="auto": the torch (cuBLAS) kernels on CUDA until the Triton kernels are verified on a GPU,
Triton only for module shapes a verified GPU run measured faster, the C++ kernels on the CPU;
each choice said once, in the log and in explain(). A backend added through the registry alone
runs a patched model; ranks above a backend's limit go to the backend it names."""
import json
import logging

import pytest

import peftkern
from peftkern.ops import backend as backend_contract
from peftkern.ops import library, registry
from tests.helpers.models import tiny_model, tokens


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(registry, "_SAID", set())


def test_auto_on_cuda_is_the_torch_backend_and_says_why(fresh_log, caplog):
    with caplog.at_level(logging.INFO, logger="peftkern"):
        backend = registry.resolve("auto", "cuda", (2048, 2048, 16))
        registry.resolve("auto", "cuda", (256, 2048, 16))
    assert backend.name == "torch" and "cuda" in backend.devices
    said = [r.getMessage() for r in caplog.records if "backend='auto'" in r.getMessage()]
    assert len(said) == 1 and "cuda tensors on the torch kernels" in said[0] and "not yet verified on a GPU" in said[0]


def test_without_a_verified_policy_triton_is_never_an_auto_candidate():
    assert registry.cuda_policy() == {}
    assert registry.auto_choice("cuda", (2048, 2048, 16)) == ("torch",)
    assert registry.auto_choice("cpu", (2048, 2048, 16)) == ("cpp", "torch")
    assert registry.auto_choice("mps") == ("torch",)


def test_a_verified_policy_picks_triton_only_for_its_shapes(tmp_path, monkeypatch):
    policy = tmp_path / "cuda_policy.json"
    policy.write_text(json.dumps({"verified": True, "shapes": [{"shape": [2048, 2048, 16], "backend": "triton"}]}))
    monkeypatch.setattr(registry, "CUDA_POLICY", policy)
    assert registry.auto_choice("cuda", (2048, 2048, 16)) == ("triton", "torch")
    assert registry.auto_choice("cuda", (256, 2048, 16)) == ("torch",)
    # a 4-bit base runs the fused QLoRA kernel: a dense entry says nothing about it, a "4bit" entry does
    assert registry.auto_choice("cuda", (2048, 2048, 16), dense=False) == ("torch",)
    policy.write_text(json.dumps({"verified": True, "shapes": [{"shape": [2048, 2048, 16], "backend": "triton",
                                                                "base": "4bit"}]}))
    assert registry.auto_choice("cuda", (2048, 2048, 16), dense=False) == ("triton", "torch")
    assert registry.auto_choice("cuda", (2048, 2048, 16)) == ("torch",)
    policy.write_text(json.dumps({"verified": False, "shapes": [{"shape": [2048, 2048, 16], "backend": "triton"}]}))
    assert registry.auto_choice("cuda", (2048, 2048, 16)) == ("torch",)  # an unverified run decides nothing


def test_a_verified_policy_may_pick_the_cpp_node_and_nothing_unknown(tmp_path, monkeypatch):
    policy = tmp_path / "cuda_policy.json"
    policy.write_text(json.dumps({"verified": True, "shapes": [{"shape": [2048, 2048, 16], "backend": "cpp"},
                                                              {"shape": [256, 2048, 16], "backend": "numba"}]}))
    monkeypatch.setattr(registry, "CUDA_POLICY", policy)
    assert registry.auto_choice("cuda", (2048, 2048, 16)) == ("cpp", "torch")
    assert registry.auto_choice("cuda", (256, 2048, 16)) == ("torch",)


def test_the_repository_ships_no_unmeasured_policy():
    """A policy file may only come from a GPU run (benchmarks/gpu_check.sh); none has passed yet."""
    assert not registry.CUDA_POLICY.exists() or json.loads(registry.CUDA_POLICY.read_text()).get("measured_on")


def test_explicit_triton_on_the_cpu_without_the_interpreter_names_the_cause(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(registry.BackendUnavailable, match="TRITON_INTERPRET"):
        registry.resolve("triton", "cpu")


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="auto, triton, cpp, torch"):
        registry.resolve("cuda", "cuda")


def _counting_torch_backend(calls):
    """A backend of our own: the torch kernels, counting the adapter's forward calls."""
    from peftkern.ops.backends import torch as torch_backend

    def forward(*args):
        calls.append("adapter_forward")
        return torch_backend.adapter_forward(*args)

    kernels = {name: getattr(torch_backend, name) for name in backend_contract.KERNEL_NAMES}
    kernels["adapter_forward"] = forward
    return backend_contract.Backend.of("dummy", ("cpu", "meta"), library.register("dummy", kernels))


def test_a_backend_added_through_the_registry_alone_runs_a_patched_model():
    calls = []
    spec = registry.register_backend(registry.BackendSpec("dummy", lambda: _counting_torch_backend(calls)))
    try:
        assert "dummy" in registry.names()
        model = peftkern.patch(tiny_model("llama"), "lora", backend="dummy")
        assert {row["backend"] for row in peftkern.explain(model).rows} == {"dummy"}
        ids = tokens()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert len(calls) == len(model.peftkern.plan.slots)  # every adapted module ran on it
        assert all(p.grad is not None for p in model.peftkern.parameters() if p.requires_grad)
        with pytest.raises(ValueError, match="already registered"):
            registry.register_backend(spec)
    finally:
        registry.unregister_backend("dummy")
    assert "dummy" not in registry.names()


def test_the_backend_is_resolved_when_the_model_is_patched(fresh_log, caplog):
    with caplog.at_level(logging.INFO, logger="peftkern"):
        model = peftkern.patch(tiny_model("llama"), "pg_pos")
    said = [r.getMessage() for r in caplog.records if "backend='auto' runs cpu tensors" in r.getMessage()]
    assert len(said) == 1  # at patch time, before any forward
    shape = model.model.layers[0].self_attn.q_proj.shape
    assert ("cpu", shape, True) in model.peftkern.backends._cache and ("cpu", None, True) in model.peftkern.backends._cache


@pytest.mark.skipif(registry.unavailable("triton", "cpu") is not None, reason="needs the Triton interpreter")
def test_ranks_above_a_backends_limit_run_on_the_backend_it_names():
    model = peftkern.patch(tiny_model("llama"), "vera", rank=8, backend="triton",
                           targets=["q_proj"])  # q_proj is 32 -> 32: rank 8 fits, the limit is tested below
    assert {row["backend"] for row in peftkern.explain(model).rows} == {"triton"}
    b = registry.resolve("triton", "cpu", (4096, 4096, 256))
    assert b.name == "torch"
    resolver = registry.Resolver("triton")
    assert resolver.get("cpu", (4096, 4096, 256)).name == "torch"
    assert resolver.note("cpu", (4096, 4096, 256)) == "rank 256 > triton's 128: on torch"
    assert resolver.note("cpu", (4096, 4096, 128)) == ""
