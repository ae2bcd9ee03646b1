"""What a fine-tuning run leaves behind: metrics JSON, the curves PNG, and the several-seed summary."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..files import atomic_write


@dataclass
class RunResult:
    task: str
    method: str
    metric: str  # name: accuracy | matthews | pearson
    value: float  # the reported metric (final epoch; with --split-dev, the epoch chosen on dev)
    seed: int
    epochs: List[Dict[str, float]]  # per epoch: train_loss, eval_metric, eval_loss (and dev_metric)
    step_losses: List[float]
    seconds: float
    sizes: Dict[str, int]
    trainable: Dict[str, int]
    backend: str
    output_dir: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class Summary:
    results: List[RunResult]

    @property
    def values(self) -> List[float]:
        return [r.value for r in self.results]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1); 0 for a single run."""
        v = self.values
        if len(v) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))

    def to_json(self) -> Dict[str, Any]:
        r0 = self.results[0]
        return {"task": r0.task, "method": r0.method, "metric": r0.metric, "mean": self.mean, "std": self.std,
                "seeds": [r.seed for r in self.results], "values": self.values,
                "seconds": [r.seconds for r in self.results]}


def write_outputs(out_dir: Path, results: List[RunResult]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = results[0].to_json() if len(results) == 1 else [r.to_json() for r in results]
    atomic_write(out_dir / "metrics.json", (json.dumps(payload, indent=2) + "\n").encode())
    plot_curves(out_dir / "curves.png", results)


def write_summary(out_dir: Path, summary: Summary) -> None:
    """summary.json (mean ± std over the seeds) and one PNG with every seed's curves."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "summary.json", (json.dumps(summary.to_json(), indent=2) + "\n").encode())
    plot_curves(out_dir / "curves.png", summary.results)


def plot_curves(path: Path, results: List[RunResult]) -> None:
    """Training loss per step (left) and the evaluation metric per epoch (right), one line per seed."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        ax_loss.plot(range(1, len(r.step_losses) + 1), _smooth(r.step_losses), label=f"seed {r.seed}", lw=1)
        ax_metric.plot([e["epoch"] for e in r.epochs], [e["eval_metric"] for e in r.epochs], marker="o",
                       label=f"seed {r.seed}")
    r0 = results[0]
    ax_loss.set(title=f"{r0.task} / {r0.method}: training loss", xlabel="step", ylabel="loss (moving average)")
    ax_metric.set(title=f"evaluation {r0.metric}", xlabel="epoch", ylabel=r0.metric)
    ax_metric.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _smooth(values: List[float], window: int = 10) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


__all__ = ["Summary", "write_outputs", "write_summary", "plot_curves"]
