"""Figures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np


def bucket_log10(losses: np.ndarray, bucket: int = 1000) -> np.ndarray:
    """The lecture's `torch.tensor(lossi).view(-1, 1000).mean(1)` of log10 losses.

    A trailing partial bucket is averaged over the steps it has.
    """
    lg = np.log10(np.asarray(losses, np.float64))
    n_full = len(lg) // bucket
    out = list(lg[: n_full * bucket].reshape(n_full, bucket).mean(1))
    if len(lg) % bucket:
        out.append(lg[n_full * bucket:].mean())
    return np.asarray(out)


def save_figure(fig, path: str | Path) -> Path:
    """Write atomically (temp name, then rename) so an earlier figure is never half-replaced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_loss(losses: np.ndarray, path: str | Path, title: str = "training loss",
              bucket: int = 1000) -> Path:
    """log10 minibatch loss averaged over `bucket`-step buckets, as in the lecture."""
    curve = bucket_log10(losses, bucket)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(len(curve)) * bucket, curve, label=f"mean over {bucket} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("log10(loss)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
