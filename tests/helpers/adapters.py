"""Patched tiny models with every adapter tensor moved off its initial value, for save/load and export tests."""
import copy

import torch

import peftkern
from peftkern.heads import trained_outside_adapter
from tests.helpers.models import tiny_model

# options a method cannot run without (AdaLoRA needs its schedule length)
REQUIRED_OPTIONS = {"adalora": {"total_step": 10}, "hyper_adalora": {"total_step": 10}}


def options_for(method):
    return dict(REQUIRED_OPTIONS.get(method, {}))


def perturb(model, seed=0):
    """Move every adapter tensor (and the head) off its initial value: B = 0 or Λ = 0 at
    init would make an equality test trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.peftkern.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
        for p in trained_outside_adapter(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))


def patched(family, head, method, **extra):
    base = tiny_model(family, head)
    model = peftkern.patch(copy.deepcopy(base), method, rank=4, **options_for(method), **extra)
    perturb(model)
    return base, model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits
