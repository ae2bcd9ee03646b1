"""The C++ backend inside the engine: dispatch, explain, path records, whole models, and
what happens when the extension is missing or outdated."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import peftkern
from peftkern.ops import registry
from peftkern.ops.backends import torch as torch_kernels
from tests.helpers.models import tiny_model, tokens

if os.environ.get("PEFTKERN_NO_EXT") == "1":
    pytest.skip("installed with PEFTKERN_NO_EXT=1: no C++ extension", allow_module_level=True)

from peftkern.ops.backends import cpp as cb  # noqa: E402
from peftkern.ops.functions import BoundOps  # noqa: E402

ops = BoundOps(cb.BACKEND)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_resolves_to_cpp_on_cpu_without_warning():
    model = tiny_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftkern.patch(model, "lora", rank=4, backend="auto")
        model(tokens())
    assert not [w for w in caught if "peftkern" in str(w.message)]  # a fallback would warn
    rows = peftkern.explain(model).rows
    assert rows and {r["backend"] for r in rows} == {"cpp"}
    assert registry.resolve("auto", "cpu") is cb.BACKEND


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_model_runs_the_cpp_node_says_so_and_matches_the_torch_backend(dropout):
    """Without dropout (and in eval) a DoRA module on the cpp backend is one C++ autograd node; with
    dropout in training, the Python DoraFunction. explain() names which; both equal the torch
    backend's results."""
    ids = tokens(batch=2, seq=7)
    runs = []
    for backend in ("torch", "cpp"):
        model = tiny_model("llama", seed=1)
        peftkern.patch(model, "lora", rank=4, use_dora=True, dropout=dropout, backend=backend)
        with torch.no_grad():
            for p in (p for p in model.parameters() if p.requires_grad):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        runs.append(_grads(model, ids) if not dropout else (model(input_ids=ids).logits, {}))
        if backend == "cpp":
            q = model.model.layers[0].self_attn.q_proj.train()
            x = torch.randn(1, 3, q.in_features, requires_grad=True)
            fn = type(q(x).grad_fn).__name__
            assert fn == ("DoraFunctionBackward" if dropout else "CppFunction"), fn
            q.eval()
            assert type(q(x).grad_fn).__name__ == "CppFunction"  # no dropout in eval
            path = peftkern.explain(model).rows[0]["path"]
            assert "one C++ autograd node" in path
            assert ("Python autograd Function while dropout applies" in path) == bool(dropout)
        # the magnitude row states the rank above which the merged path gives the norm: the build's own
        magnitude = peftkern.explain(model).rows[0]["magnitude"]
        assert (f"rank > {cb._C.MAX_FUSED_RANK}" in magnitude) == (backend == "cpp"), magnitude
    (logits_t, grads_t), (logits_c, grads_c) = runs
    if not dropout:
        torch.testing.assert_close(logits_c, logits_t, rtol=1e-4, atol=1e-5)
        assert grads_c.keys() == grads_t.keys() and any("magnitude" in n for n in grads_c)
        for name in grads_t:
            torch.testing.assert_close(grads_c[name], grads_t[name], rtol=1e-4, atol=1e-5, msg=name)


def test_backend_devices_follow_the_build():
    assert cb.BACKEND.devices[0] == "cpu"
    assert ("cuda" in cb.BACKEND.devices) == bool(cb._C.WITH_CUDA)
    assert "meta" in cb.BACKEND.devices  # shapes only: the launch counts of benchmarks/bench_launches.py


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,options", [("lora", {}), ("vera", {}), ("tied_lora", {"joint": True}),
                                            ("tied_lora", {"train": "ABuv"})])
def test_model_matches_torch_backend(method, options):
    """Same model, same factors: the cpp backend's logits and every adapter gradient match the torch backend's."""
    ids = tokens(batch=2, seq=7)
    runs = []
    for backend in ("torch", "cpp"):
        model = tiny_model("llama", seed=1)
        peftkern.patch(model, method, rank=4, backend=backend, **options)
        torch.manual_seed(5)  # give B (zero at init for lora) a non-zero value, identically in both runs
        with torch.no_grad():
            for p in model.peftkern.parameters():
                p.add_(0.1 * torch.randn_like(p))
        runs.append(_grads(model, ids))
    (logits_t, grads_t), (logits_c, grads_c) = runs
    torch.testing.assert_close(logits_c, logits_t, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_t.keys() and grads_c
    for name in grads_t:
        torch.testing.assert_close(grads_c[name], grads_t[name], rtol=1e-4, atol=1e-6, msg=name)


def test_path_counts_record_what_ran():
    model = tiny_model("llama")
    peftkern.patch(model, "lora", rank=4, backend="cpp")
    ids = tokens()
    cb.reset_path_counts()
    with cb.forced_path("merged"):
        model(input_ids=ids, labels=ids).loss.backward()
    counts = cb.path_counts()
    n_modules = len(peftkern.explain(model).rows)
    assert counts.get("adapter.forward.merged") == n_modules
    assert counts.get("adapter.backward.merged") == n_modules
    assert not any(k.endswith(("fused", "addmm")) for k in counts)
    cb.reset_path_counts()
    assert cb.path_counts() == {}


def test_cost_model_choices():
    """Small batches and ranks stream the rank-r work; many rows merge in fp32; bf16 never merges."""
    assert cb.planned_paths(64, 576, 576, 8) == ("fused", "fused")
    assert cb.planned_paths(8192, 192, 576, 8)[0] == "merged"
    assert cb.planned_paths(8192, 192, 576, 8, dtype=torch.bfloat16) == ("addmm", "addmm")
    assert cb.planned_paths(64, 576, 576, 128) == ("addmm", "addmm")  # GEMM-sized ranks: MKL wins
    # ... and with enough rows W_eff (N·K·r multiply-adds) costs less than M·r·(K + N); the
    # forward keeps it, so the backward's dx is the merged GEMM too (VeRA r=128 at 4×128 tokens)
    assert cb.planned_paths(512, 576, 576, 128) == ("merged", "merged")
    assert cb.planned_paths(512, 192, 576, 128) == ("merged", "merged")
    assert cb.planned_paths(512, 576, 576, 128, dtype=torch.bfloat16) == ("addmm", "addmm")
    with cb.forced_path("addmm"):
        assert cb.planned_paths(64, 576, 576, 8) == ("addmm", "addmm")


def test_trains_like_the_torch_backend():
    from tests.helpers.training import train_steps

    losses = {}
    for backend in ("torch", "cpp"):
        model = tiny_model("llama", seed=2)
        peftkern.patch(model, "lora", rank=4, backend=backend)
        losses[backend] = train_steps(model, steps=4, lr=3e-2)
    assert losses["cpp"][-1] < losses["cpp"][0]
    torch.testing.assert_close(torch.tensor(losses["cpp"]), torch.tensor(losses["torch"]), rtol=1e-4, atol=1e-5)


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, so that faking a broken extension cannot leak here."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_missing_or_outdated_extension_raises_import_error_and_auto_warns():
    """One fresh interpreter: a missing extension, the fallback it causes, then a stale build."""
    proc = _run_isolated("""
        import sys, types, warnings
        sys.modules["peftkern._C"] = None  # what Python does for a module that cannot be imported
        import peftkern
        try:
            from peftkern.ops.backends import cpp as cpp_kernels
        except ImportError as exc:
            print("IMPORT_ERROR:", exc)
        from peftkern.ops import registry
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = registry.resolve("auto", "cpu")
        print("RESOLVED:", backend.name)
        print("WARNINGS:", [str(w.message) for w in caught])
        try:
            registry.resolve("cpp", "cpu")
        except registry.BackendUnavailable as exc:
            print("EXPLICIT:", exc)
        stale = types.ModuleType("peftkern._C")  # an old build: it imports but lacks the ops
        stale.build_info = lambda: "cpu"
        sys.modules["peftkern._C"] = peftkern._C = stale
        try:
            from peftkern.ops.backends import cpp as cpp_kernels
        except ImportError as exc:
            print("STALE:", exc)
    """)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "IMPORT_ERROR: peftkern's C++ extension peftkern._C is not available" in out
    assert "pip install --no-build-isolation -e ." in out
    assert "RESOLVED: torch" in out
    warning_line = next(line for line in out.splitlines() if line.startswith("WARNINGS:"))
    assert "wanted 'cpp'" in warning_line and "peftkern._C is not available" in warning_line
    assert "EXPLICIT:" in out
    stale_line = next(line for line in out.splitlines() if line.startswith("STALE:"))
    assert "outdated build" in stale_line and "adapter_forward" in stale_line


def test_torch_and_cpp_backends_are_distinct():
    """Guard against dispatch silently aliasing the cpp name to the torch ops."""
    assert cb.BACKEND.adapter_forward is not torch_kernels.BACKEND.adapter_forward
    assert cb.BACKEND.name == "cpp"
