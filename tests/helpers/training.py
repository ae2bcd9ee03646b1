"""A short training loop shared by the per-method training tests."""
import torch

from tests.helpers.models import tiny_model, tokens


def train_steps(model, steps=50, lr=3e-2, seed=0, ids=None):
    """Train on one fixed batch (a memorisation task any working adapter can make progress on).
    Returns the list of losses."""
    torch.manual_seed(seed)
    ids = tokens(batch=4, seq=12, seed=seed) if ids is None else ids
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def assert_learns(losses, min_drop=0.02):
    """The base is frozen and the batch fixed, so any sustained drop is the adapter learning."""
    first, last = losses[0], sum(losses[-5:]) / 5
    assert all(x == x for x in losses), "NaN loss"
    assert last < first * (1 - min_drop), f"loss did not go down enough: {first:.4f} -> {last:.4f}"


__all__ = ["train_steps", "assert_learns", "tiny_model", "tokens"]
