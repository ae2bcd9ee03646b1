"""backend="auto": the torch (cuBLAS) kernels on CUDA until the Triton kernels are verified on a GPU,
Triton only for module shapes a verified GPU run measured faster, the C++ kernels on the CPU;
each choice said once, in the log and in explain()."""
import json
import logging

import pytest

from peftkern.ops import dispatch


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(dispatch, "_SAID", set())


def test_auto_on_cuda_is_the_torch_backend_and_says_why(fresh_log, caplog):
    with caplog.at_level(logging.INFO, logger="peftkern"):
        backend = dispatch.resolve("auto", "cuda", (2048, 2048, 16))
        dispatch.resolve("auto", "cuda", (256, 2048, 16))
    assert backend.name == "torch" and "cuda" in backend.devices
    said = [r.getMessage() for r in caplog.records if "backend='auto'" in r.getMessage()]
    assert len(said) == 1 and "cuda tensors on the torch kernels" in said[0] and "GPU suite" in said[0]


def test_without_a_verified_policy_triton_is_never_an_auto_candidate():
    assert dispatch.cuda_policy() == {}
    assert dispatch.auto_choice("cuda", (2048, 2048, 16)) == ("torch",)
    assert dispatch.auto_choice("cpu", (2048, 2048, 16)) == ("cpp", "torch")
    assert dispatch.auto_choice("mps") == ("torch",)


def test_a_verified_policy_picks_triton_only_for_its_shapes(tmp_path, monkeypatch):
    policy = tmp_path / "cuda_policy.json"
    policy.write_text(json.dumps({"verified": True, "shapes": [{"shape": [2048, 2048, 16], "backend": "triton"}]}))
    monkeypatch.setattr(dispatch, "CUDA_POLICY", policy)
    assert dispatch.auto_choice("cuda", (2048, 2048, 16)) == ("triton", "torch")
    assert dispatch.auto_choice("cuda", (256, 2048, 16)) == ("torch",)
    policy.write_text(json.dumps({"verified": False, "shapes": [{"shape": [2048, 2048, 16], "backend": "triton"}]}))
    assert dispatch.auto_choice("cuda", (2048, 2048, 16)) == ("torch",)  # an unverified run decides nothing


def test_a_verified_policy_may_pick_the_cpp_node_and_nothing_unknown(tmp_path, monkeypatch):
    policy = tmp_path / "cuda_policy.json"
    policy.write_text(json.dumps({"verified": True, "shapes": [{"shape": [2048, 2048, 16], "backend": "cpp"},
                                                              {"shape": [256, 2048, 16], "backend": "numba"}]}))
    monkeypatch.setattr(dispatch, "CUDA_POLICY", policy)
    assert dispatch.auto_choice("cuda", (2048, 2048, 16)) == ("cpp", "torch")
    assert dispatch.auto_choice("cuda", (256, 2048, 16)) == ("torch",)


def test_the_repository_ships_no_unmeasured_policy():
    """A policy file may only come from a GPU run (benchmarks/gpu_check.sh); none has passed yet."""
    assert not dispatch.CUDA_POLICY.exists() or json.loads(dispatch.CUDA_POLICY.read_text()).get("measured_on")


def test_explicit_triton_on_the_cpu_without_the_interpreter_names_the_cause(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET"):
        dispatch.resolve("triton", "cpu")


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="auto, triton, cpp, torch"):
        dispatch.resolve("cuda", "cuda")
