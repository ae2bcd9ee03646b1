"""DDP and FSDP2 (gloo, 2 CPU processes): a patched model trained on half batches per rank ends with
the parameters of one process trained on the whole batch, for every kind of factor source.

One spawn runs every case (spawning and importing transformers dominate the cost); each rank
writes its final tensors, and the test compares rank 0 with rank 1 (identical) and with a
single process trained here on the global batch (equal to rounding).

FSDP2 (``torch.distributed.fsdp.fully_shard``) runs on the CPU with gloo in torch 2.13, both
with the root alone sharded and with every decoder block sharded too; its cases also run an
evaluation pass before the last step and after it, which a stale generated-factor cache
(PassCache keys on ``_version`` and ``data_ptr()`` of parameters that FSDP2 re-gathers) would
get wrong.

The same workers then run `peftkern finetune` under DDP twice: once whole, once killed after step 7
and resumed from the checkpoint of step 6; both must end with the same metrics and adapter.
"""
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import peftkern
from peftkern import patching
from peftkern.app import distributed
from tests.helpers.data import save_tiny_bert, write_sst2_like
from tests.helpers.dist import free_port
from tests.helpers.models import tiny_model, tokens

STEPS = 4
LABELS = torch.tensor([0, 1, 1, 0])
# adalora: init_r 4 -> target 2 over a 6-step schedule whose budgeting runs during the 4 steps trained here
CASES = {
    "lora": dict(method="lora"),
    "lora+dora": dict(method="lora", use_dora=True),  # the magnitudes' norms batched across modules
    "tied_lora": dict(method="tied_lora"),
    "pg_pos": dict(method="pg_pos"),
    "adalora": dict(method="adalora", init_r=4, tinit=1, tfinal=1, deltaT=1, total_step=6),
    # reentrant activation checkpointing: the tied / generated factors become ready once per block, which
    # plain DDP refuses ("Expected to mark a variable ready only once"); wrap_ddp turns on static_graph
    "tied_lora+reentrant": dict(method="tied_lora", checkpointing="reentrant"),
    "pg_pos+reentrant": dict(method="pg_pos", checkpointing="reentrant"),
    "pg_pos+non-reentrant": dict(method="pg_pos", checkpointing="non-reentrant"),
}


def _build(case):
    spec = dict(CASES[case])
    method, checkpointing = spec.pop("method"), spec.pop("checkpointing", False)
    model = tiny_model("llama", "cls", seed=0)  # no dropout: ranks and the single process see the same function
    rank = 2 if method == "adalora" else 4
    peftkern.patch(model, method, rank=rank, backend="torch", **spec)
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    return model


def _train(model, rank, world, wrapped=None):
    trained = wrapped if wrapped is not None else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x = tokens(4, 7, seed=3)
    for _ in range(STEPS):
        loss = trained(input_ids=x[rank::world], labels=LABELS[rank::world]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _result(model):
    out = {f"state.{k}": v.detach().clone() for k, v in patching.state_of(model).state_dict().items()}
    out["score.weight"] = model.score.weight.detach().clone()
    if patching.state_of(model).plan.method == "adalora":
        out["rank_pattern"] = peftkern.rank_pattern(model)
    return out


FSDP_CASES = [(m, mode) for m in ("lora", "pg_pos", "lora+dora") for mode in ("root", "per_block")]


def _patch(model, method):
    """``method``, or "lora+dora": LoRA with DoRA's magnitudes (whose batched norms must not read another
    block's parameters, which FSDP2 frees outside that block's forward)."""
    name, _, extra = method.partition("+")
    return peftkern.patch(model, name, rank=4, backend="torch", use_dora=extra == "dora")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor shard -> the whole tensor


def _fsdp_result(model):
    out = {f"state.{k}": _full(v).detach().clone() for k, v in patching.state_of(model).state_dict().items()}
    out["score.weight"] = _full(model.score.weight).detach().clone()
    return out


def _train_with_evals(model, rank, world, device="cpu"):
    """STEPS steps as _train, with a no-grad evaluation of the global batch before the last step and after
    it; returns (first, last) evaluation logits."""
    x, labels = tokens(4, 7, seed=3).to(device), LABELS.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    logits = []
    for step in range(STEPS):
        if step == STEPS - 1:
            logits.append(_evaluate(model, x))
        model.train()
        loss = model(input_ids=x[rank::world], labels=labels[rank::world]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    logits.append(_evaluate(model, x))
    return logits


def _evaluate(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.detach().clone()


SAVE_PATHS = ("save_pretrained", "peftkern.save", "gathered state_dict")


def _fsdp_case(method, mode, rank, world, out_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = tiny_model("llama", "cls", seed=0)
    _patch(model, method)
    if mode == "per_block":
        for block in model.model.layers:
            fully_shard(block)
    fully_shard(model)
    logits = _train_with_evals(model, rank, world)
    # every way to save from a sharded model (peft#3251, accelerate#4206): one complete adapter, rank 0 writing
    where = {p: os.path.join(out_dir, f"fsdp-{method}-{mode}-{i}") for i, p in enumerate(SAVE_PATHS)}
    model.save_pretrained(where["save_pretrained"], is_main_process=rank == 0)
    peftkern.save(model, where["peftkern.save"])
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # what the Trainer does under FSDP: the main process alone, with the gathered state dict
        model.save_pretrained(where["gathered state_dict"], state_dict=sd)
    return {**_fsdp_result(model), "logits": logits, "saved": where}


def _finetune_resume(tiny, out_dir):
    """`peftkern finetune` under DDP: a whole run, and a run killed after step 7 then resumed from the
    checkpoint of step 6 (dropout on: each rank's RNG state must come back)."""
    from peftkern.app import checkpoint, cli
    from tests.helpers.runs import Crash, crash_after, finetune_args

    root = Path(out_dir)
    assert cli.main(finetune_args(tiny, root / "whole", "pg_pos")) == 0
    with pytest.MonkeyPatch.context() as patched:
        crash_after(patched, 7)
        try:
            cli.main(finetune_args(tiny, root / "cut", "pg_pos"))
            raise AssertionError("the run was not interrupted")
        except Crash:
            pass
    assert checkpoint.latest(root / "cut").name == "step-00000006"
    assert cli.main(finetune_args(tiny, root / "cut", "pg_pos", "--resume")) == 0


def _worker(rank, world, port, out_dir, tiny):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.init_from_env("cpu")
    try:
        results = {}
        for case in CASES:
            model = _build(case)
            _train(model, ctx.rank, ctx.world_size, distributed.wrap_ddp(model, ctx))
            results[case] = _result(model)
        for method, mode in FSDP_CASES:
            results[f"fsdp2 {method} {mode}"] = _fsdp_case(method, mode, ctx.rank, ctx.world_size, out_dir)
        _finetune_resume(tiny, out_dir)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown(ctx)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    tiny = {"model": str(save_tiny_bert(out / "model")), "data": str(write_sst2_like(out / "glue", n_train=44))}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, free_port(), str(out), tiny), nprocs=2, join=True)
    return out


@pytest.fixture(scope="module")
def ranks(spawned):
    return [torch.load(spawned / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_matches_one_process_on_the_global_batch(ranks, case):
    model = _build(case)
    before = _result(model)
    _train(model, 0, 1)
    single = _result(model)
    tensors = [k for k in single if k != "rank_pattern"]
    changed = [k for k in tensors if not torch.equal(before[k], single[k])]
    assert changed, "training changed nothing: the comparison would be vacuous"
    for k in tensors:
        torch.testing.assert_close(ranks[0][case][k], ranks[1][case][k], rtol=0, atol=0, msg=f"{case} {k}: ranks differ")
        torch.testing.assert_close(ranks[0][case][k], single[k], rtol=1e-4, atol=1e-5, msg=f"{case} {k}")


def test_adalora_allocation_identical_on_every_rank(ranks):
    patterns = [r["adalora"]["rank_pattern"] for r in ranks]
    lams = [r["adalora"]["state.lam"] for r in ranks]
    assert patterns[0] == patterns[1]
    assert torch.equal(lams[0], lams[1])
    kept = [k for row in patterns[0].values() for k in row]
    assert 0 < sum(kept) < len(kept), "the schedule pruned nothing: allocation was not exercised"
    pruned = ~torch.tensor([row for row in patterns[0].values()])
    assert torch.all(lams[0][pruned] == 0), "a pruned component's Λ is not masked to zero"
    # and the single process allocates the same
    model = _build("adalora")
    _train(model, 0, 1)
    assert peftkern.rank_pattern(model) == patterns[0]


@pytest.mark.parametrize("method,mode", FSDP_CASES)
def test_fsdp2_matches_one_process_on_the_global_batch(ranks, method, mode):
    got = [r[f"fsdp2 {method} {mode}"] for r in ranks]
    model = tiny_model("llama", "cls", seed=0)
    _patch(model, method)
    logits = _train_with_evals(model, 0, 1)
    single = _fsdp_result(model)
    assert not torch.equal(logits[0], logits[1]), "the last step changed nothing: the eval check would be vacuous"
    for k in single:
        torch.testing.assert_close(got[0][k], got[1][k], rtol=0, atol=0, msg=f"{k}: ranks differ")
        torch.testing.assert_close(got[0][k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    for before_last, after_last in (got[0]["logits"], got[1]["logits"]):
        torch.testing.assert_close(before_last, logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after_last, logits[1], rtol=1e-4, atol=1e-5)  # no stale generated factors


def test_finetune_under_ddp_resumes_to_the_uninterrupted_result(spawned):
    from tests.helpers.runs import assert_same_run, outputs

    whole, cut = outputs(spawned / "whole"), outputs(spawned / "cut")
    assert whole[0]["config"]["processes"] == 2
    assert_same_run(cut, whole)


@pytest.mark.gpu
def test_fsdp2_on_cuda_matches_the_unsharded_model(tmp_path):
    """One process, one GPU (nccl): per-block FSDP2 with the default backend (triton on CUDA) trains and
    evaluates as the unsharded model does. Written for a GPU machine; it has not run on one yet."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        runs = []
        for sharded in (False, True):
            model = tiny_model("llama", "cls", seed=0).cuda()
            peftkern.patch(model, "pg_pos", rank=4)
            if sharded:
                for block in model.model.layers:
                    fully_shard(block)
                fully_shard(model)
            logits = _train_with_evals(model, 0, 1, device="cuda")
            runs.append({**_fsdp_result(model), "logits": logits})
    finally:
        dist.destroy_process_group()
    plain, sharded = runs
    for k in plain:
        if k != "logits":
            torch.testing.assert_close(sharded[k], plain[k], rtol=1e-3, atol=1e-4, msg=k)
    for a, b in zip(sharded["logits"], plain["logits"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("path", SAVE_PATHS)
@pytest.mark.parametrize("method,mode", FSDP_CASES)
def test_an_fsdp2_model_saves_one_complete_adapter_that_loads_exactly(ranks, method, mode, path):
    result = ranks[0][f"fsdp2 {method} {mode}"]
    directory = Path(result["saved"][path])
    files = sorted(f.name for f in directory.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "peftkern_config.json",
                     "peftkern_model.safetensors"]
    loaded = peftkern.load(tiny_model("llama", "cls", seed=0), directory, backend="torch")
    state = patching.state_of(loaded).state_dict()
    for k, v in state.items():
        torch.testing.assert_close(v, result[f"state.{k}"], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(loaded.score.weight, result["score.weight"], rtol=0, atol=0)
    torch.testing.assert_close(_evaluate(loaded, tokens(4, 7, seed=3)), result["logits"][-1], rtol=1e-5, atol=1e-6)


def test_fsdp2_refuses_adalora_and_a_restore_into_its_shards_clearly(tmp_path):
    """Both failed in torch's ops ("mixed torch.Tensor and DTensor"), AdaLoRA at its first step and the
    Trainer's resume hook half way through a load (a review's findings); each is a clear error now."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from peftkern import native_format

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = peftkern.patch(tiny_model("llama"), "lora")
        peftkern.save(model, tmp_path / "saved")
        fully_shard(model)
        with pytest.raises(ValueError, match="sharded by FSDP2.*restore the adapter before sharding"):
            native_format.restore(model, tmp_path / "saved")
        ada = peftkern.patch(tiny_model("llama"), "adalora", total_step=10)
        fully_shard(ada)
        optimizer = torch.optim.AdamW([p for p in ada.parameters() if p.requires_grad], lr=1e-2)
        ids = tokens()
        ada(input_ids=ids, labels=ids).loss.backward()
        with pytest.raises(NotImplementedError, match="FSDP2 shards them.*DDP"):
            optimizer.step()
    finally:
        dist.destroy_process_group()
