"""The classification/regression loop's pieces: the schedule, gradient clipping, the regression head's start."""
import pytest
import torch
from torch import nn

from peftkern.app import cli, train


def test_linear_schedule_rises_then_decays_like_transformers():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = train.linear_schedule(opt, total_steps=10, warmup_steps=4)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # transformers' get_linear_schedule_with_warmup gives step/4 during warm-up; ours starts above 0
    # so that the first update is not wasted, and reaches the peak at the same step
    assert seen[:5] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0])
    assert seen[5:] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_linear_schedule_without_warmup_is_lefts_decay():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = train.linear_schedule(opt, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0, 1.5, 1.0, 0.5])


class _Recorder(torch.optim.SGD):
    def __init__(self, params):
        self.norms = []
        super().__init__(params, lr=0.0)

    def step(self, closure=None):
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for g in self.param_groups
                                                                     for p in g["params"]]))))
        return super().step(closure)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return type("Out", (), {"loss": (self.lin(x) * 1000.0).pow(2).mean()})()


@pytest.mark.parametrize("max_grad_norm,clipped", [(1.0, True), (0.0, False), (None, False)])
def test_train_epoch_clips_the_global_gradient_norm(max_grad_norm, clipped):
    torch.manual_seed(0)
    model = _Model()
    opt = _Recorder(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    bar = type("Bar", (), {"update": lambda self, n: None, "set_postfix": lambda self, **k: None})()
    train.train_epoch(model, [{"x": torch.randn(4, 3)}] * 2, opt, sched, bar, False, max_grad_norm=max_grad_norm)
    assert len(opt.norms) == 2
    if clipped:
        assert max(opt.norms) == pytest.approx(1.0, rel=1e-5)
    else:
        assert min(opt.norms) > 100.0


@pytest.mark.parametrize("field,value,words", [
    ("warmup_ratio", 1.0, "warmup_ratio must be in [0, 1)"),
    ("warmup_ratio", -0.1, "warmup_ratio must be in [0, 1)"),
    ("max_grad_norm", -1.0, "max_grad_norm must be >= 0"),
])
def test_bad_schedule_values_are_named(field, value, words):
    config = train.RunConfig(model="unused", data_dir="unused", method="lora", lr=1e-3, **{field: value})
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config.resolved()


def test_the_cli_passes_clipping_and_warmup_and_neither_is_on_by_default():
    parser = cli.build_parser()
    default = cli.run_config(parser.parse_args(["finetune", "--task", "sst2", "--data-dir", "d"]))
    assert not default.max_grad_norm and default.warmup_ratio == 0.0
    given = cli.run_config(parser.parse_args(["finetune", "--task", "sst2", "--data-dir", "d", "--max-grad-norm", "1",
                                              "--warmup-ratio", "0.1"]))
    assert given.max_grad_norm == 1.0 and given.warmup_ratio == 0.1


def test_sft_refuses_the_classification_loops_clipping_flag(capsys):
    assert cli.main(["finetune", "--task", "sft", "--data", "x.jsonl", "--max-grad-norm", "1"]) == 2
    assert "--max-grad-norm applies to classification/regression tasks" in capsys.readouterr().err


def test_a_fresh_regression_head_starts_at_the_targets_mean():
    model = nn.Sequential()
    model.add_module("pre", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 1))
    assert train.start_at_the_mean(model, ["head"], [1.0, 2.0, 6.0]) == "head"
    assert float(model.head.bias.detach()) == pytest.approx(3.0)
    assert train.start_at_the_mean(model, [], [1.0]) is None  # a head from the checkpoint keeps its offset
    assert float(model.head.bias.detach()) == pytest.approx(3.0)


def test_regression_tasks_take_the_methods_regression_rate():
    from peftkern.methods import registry

    parser = cli.build_parser()
    sickr = cli.run_config(parser.parse_args(["finetune", "--task", "sickr", "--data-dir", "d", "--method", "lora"]))
    sst2 = cli.run_config(parser.parse_args(["finetune", "--task", "sst2", "--data-dir", "d", "--method", "lora"]))
    assert (sickr.lr, sickr.lr_source) == registry.default_lr("lora", "regression")
    assert sickr.lr < sst2.lr and "SICK-R" in sickr.lr_source
    vera = cli.run_config(parser.parse_args(["finetune", "--task", "stsb", "--data-dir", "d", "--method", "vera"]))
    assert vera.lr == registry.default_lr("vera", "demo")[0] and vera.lr_source.startswith("the classification rate")
    paper = cli.run_config(parser.parse_args(["finetune", "--task", "sickr", "--data-dir", "d", "--budget", "paper"]))
    assert paper.lr == registry.default_lr("pg_pos", "paper")[0]
