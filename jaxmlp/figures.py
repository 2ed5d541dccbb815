"""The lecture's figures (matplotlib, headless), each written atomically as a PNG.

Every function takes host data (numpy, as `jax.device_get` of jaxmlp.diagnostics output),
writes one titled, labelled figure with a legend entry per layer, and returns its path.
Importing this module imports matplotlib: the rest of jaxmlp imports it only to plot.

    plot_loss                      log10 minibatch loss in 1,000-step buckets (the lecture's)

    plot_activation_histograms     tanh output density per layer (the lecture's forward pass)
    plot_gradient_histograms       density of the gradient at each tanh output (backward pass)
    plot_weight_gradient_histograms  density of each 2-D parameter's gradient
    plot_update_ratios             log10(std(update)/std(param)) over steps, against -3
    plot_saturation                tanh histogram + white/black |t| > threshold maps
    plot_layer_history             tanh std and saturated share over the steps of a run
    plot_gain_study                activation and gradient histograms per layer, one column
                                   per gain (deep network without batch norm)
    plot_fan_in_demo               output std of x @ w for differently scaled w
    plot_linear_bn_demo            forward/backward std of W @ x with and without batch norm
    write_diagnosis_figures        all figures of a `diagnostics.Diagnosis` into a folder
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import matplotlib
import numpy as np

# Headless (servers, CI) unless a backend was chosen: a notebook's inline one is kept, so that
# the user's own plt.show() still draws.
if "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt

# No JAX here: `serve_loss_plots` runs in a bare Python process (numpy and matplotlib only).


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


def figure_bytes(fig, fmt: str = "png") -> bytes:
    """The figure's file contents; closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight", format=fmt)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | Path) -> Path:
    """Write the figure atomically (`checkpoint.write_atomic`), so an earlier one is never
    half-replaced, and close it."""
    from jaxmlp.checkpoint import write_atomic

    path = Path(path)
    write_atomic(path, figure_bytes(fig, path.suffix.lstrip(".") or "png"))
    return path


def plot_loss(losses: np.ndarray, path: str | Path, title: str = "training loss",
              bucket: int = 1000) -> Path:
    """log10 minibatch loss averaged over `bucket`-step buckets, as in the lecture."""
    from jaxmlp.checkpoint import write_atomic

    write_atomic(path, loss_png(losses, title, bucket))
    return Path(path)


def serve_loss_plots() -> None:
    """Answer loss-curve requests on stdin with PNG bytes on stdout, for `LossPlotter`.

    Request: a line of JSON {"title", "bucket", "n"} then n bytes of `np.save` output; answer:
    a line with the PNG's length, then the PNG.
    """
    import sys

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    for line in stdin:
        request = json.loads(line)
        losses = np.load(io.BytesIO(stdin.read(request["n"])))
        png = loss_png(losses, request["title"], request["bucket"])
        stdout.write(f"{len(png)}\n".encode() + png)
        stdout.flush()


def loss_png(losses: np.ndarray, title: str = "training loss", bucket: int = 1000) -> bytes:
    """The loss-curve figure of `plot_loss` as PNG bytes."""
    curve = bucket_log10(losses, bucket)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(len(curve)) * bucket, curve, label=f"mean over {bucket} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("log10(loss)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_bytes(fig)


def layer_label(name: str) -> str:
    """'tanh5' -> 'layer 5 (tanh)', the lecture's legend; other names stay as they are."""
    m = re.fullmatch(r"([a-z]+)(\d+)", name)
    return f"layer {m.group(2)} ({m.group(1)})" if m else f"{name} (tanh)" if name == "h" else name


def _centres(edges) -> np.ndarray:
    edges = np.asarray(edges)
    return (edges[:-1] + edges[1:]) / 2


def _finish(ax, title: str, xlabel: str, ylabel: str, legend: bool = True,
            outside: bool = False, grid: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if grid:
        ax.grid(alpha=0.3)
    if legend and outside:  # long legends would hide the curves
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif legend:
        ax.legend(fontsize="small")


def ordered(d: dict) -> list:
    """`diagnostics.ordered`: the items in layer order (imported when used: JAX stays out of
    the plot server)."""
    from jaxmlp.diagnostics import ordered

    return ordered(d)


def _density_lines(ax, stats: dict, label) -> None:
    for name, s in ordered(stats):
        ax.plot(_centres(s["edges"]), np.asarray(s["hist"]), label=label(name, s))


def plot_activation_histograms(activations: dict, path, title: str = "activation distribution",
                               threshold: float = 0.97) -> Path:
    """One density line per layer; the legend gives mean, std and saturated share."""
    fig, ax = plt.subplots(figsize=(10, 4))
    _density_lines(ax, activations, lambda n, s: (
        f"{layer_label(n)}: mean {float(s['mean']):+.2f}, std {float(s['std']):.2f}, "
        f"saturated {100 * float(s['saturated']):.1f}%"))
    _finish(ax, f"{title} (saturated: |t| > {threshold})", "activation value t", "density",
            outside=True)
    return save_figure(fig, path)


def plot_gradient_histograms(gradients: dict, path,
                             title: str = "gradient distribution at the activations") -> Path:
    fig, ax = plt.subplots(figsize=(10, 4))
    _density_lines(ax, gradients, lambda n, s: (
        f"{layer_label(n)}: mean {float(s['mean']):+.2e}, std {float(s['std']):.2e}"))
    _finish(ax, title, "d loss / d t", "density", outside=True)
    return save_figure(fig, path)


def plot_weight_gradient_histograms(weights: dict, path, shapes: dict | None = None,
                                    title: str = "weight gradient distribution") -> Path:
    """One line per 2-D parameter; the legend gives its shape, grad std and grad:data ratio."""
    shapes = shapes or {}
    fig, ax = plt.subplots(figsize=(10, 4))
    _density_lines(ax, weights, lambda n, s: (
        f"{n} {tuple(shapes.get(n, ()))}: std {float(s['grad_std']):.2e}, "
        f"grad:data {float(s['grad_data_ratio']):.2e}"))
    _finish(ax, title, "gradient value", "density", outside=True)
    return save_figure(fig, path)


def plot_update_ratios(steps, ratios: dict, path,
                       title: str = "update:data ratio per parameter") -> Path:
    """The lecture's `ud` plot: one line per 2-D parameter and the rule-of-thumb -3."""
    fig, ax = plt.subplots(figsize=(10, 4))
    steps = np.asarray(steps)
    for name, vals in ordered(ratios):
        ax.plot(steps, np.asarray(vals, np.float64), label=name, lw=1)
    ax.axhline(-3, color="k", ls="--", label="-3 (about 1e-3 of the data per step)")
    _finish(ax, title, "step", "log10(std(update) / std(param))", outside=True)
    return save_figure(fig, path)


def plot_saturation(values: dict, path, threshold: float = 0.99,
                    title: str = "tanh outputs", sort: bool = True) -> Path:
    """Histogram of each layer's outputs and its |t| > threshold map (white = saturated).

    values: {layer: (B, units)}, put in layer order unless `sort` is False (e.g. for a dict of
    stages). A column that is white for every example is a dead unit.
    """
    layers = ordered(values) if sort else list(values.items())
    fig, axes = plt.subplots(1, 1 + len(layers), figsize=(5 + 4.2 * len(layers), 3.8),
                             squeeze=False)
    ax = axes[0, 0]
    for name, t in layers:
        ax.hist(np.asarray(t).ravel(), bins=50, range=(-1, 1), histtype="step",
                label=layer_label(name))
    _finish(ax, f"{title}: histogram", "activation value t", "count")
    for ax, (name, t) in zip(axes[0, 1:], layers, strict=True):
        t = np.asarray(t)
        mask = np.abs(t) > threshold
        ax.imshow(mask, cmap="gray", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
        _finish(ax, f"{layer_label(name)}: |t| > {threshold}\n{100 * mask.mean():.1f}% "
                f"saturated, {int(mask.all(0).sum())} dead units", "unit", "example",
                legend=False, grid=False)
    return save_figure(fig, path)


def plot_layer_history(history: dict, path, title: str = "activations during training") -> Path:
    """The std and the saturated share of each layer at the recorded steps."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, s in ordered(history["activations"]):
        a1.plot(history["step"], s["std"], marker=".", label=layer_label(name))
        a2.plot(history["step"], 100 * np.asarray(s["saturated"], np.float64), marker=".",
                label=layer_label(name))
    _finish(a1, f"{title}: std", "step", "std of t")
    _finish(a2, f"{title}: saturated share", "step", "saturated (%)")
    return save_figure(fig, path)


def _gain_label(g: float) -> str:
    return "5/3" if abs(g - 5 / 3) < 1e-9 else f"{g:g}"


def plot_gain_study(gains, probes, path,
                    title: str = "deep network without batch norm, at init") -> Path:
    """Columns: gains; rows: activation and gradient densities, one line per layer.

    probes: `diagnostics.probe_many` output (leading axis = gain), on the host.
    """
    fig, axes = plt.subplots(2, len(gains), figsize=(4.6 * len(gains), 7.5), squeeze=False,
                             layout="constrained")
    for j, g in enumerate(gains):
        acts = {n: {k: np.asarray(v)[j] for k, v in s.items()}
                for n, s in probes["activations"].items()}
        grads = {n: {k: np.asarray(v)[j] for k, v in s.items()}
                 for n, s in probes["gradients"].items()}
        _density_lines(axes[0, j], acts, lambda n, s: (
            f"{layer_label(n)}: std {float(s['std']):.2f}, sat {100 * float(s['saturated']):.0f}%"))
        _finish(axes[0, j], f"gain {_gain_label(g)}: activations", "t", "density")
        _density_lines(axes[1, j], grads, lambda n, s: (
            f"{layer_label(n)}: std {float(s['std']):.1e}"))
        _finish(axes[1, j], f"gain {_gain_label(g)}: gradients", "d loss / d t", "density")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_fan_in_demo(demo: dict, path,
                     title: str = "x @ w: the output std grows with sqrt(fan_in)") -> Path:
    """Histograms of x (1000, 10) and of x @ w for each scale of w, with their std."""
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.asarray(demo["x"])
    ax.hist(x.ravel(), bins=100, range=(-10, 10), density=True, histtype="step", lw=2,
            label=f"x: std {x.std():.2f}")
    for label, y in demo["outputs"].items():
        y = np.asarray(y)
        ax.hist(y.ravel(), bins=100, range=(-10, 10), density=True, histtype="step",
                label=f"x @ ({label}): std {y.std():.2f}")
    _finish(ax, title + " (fan_in = 10)", "value", "density")
    return save_figure(fig, path)


def plot_linear_bn_demo(demo: dict, path,
                        title: str = "forward and backward std through W @ x") -> Path:
    """Grouped bars of std(x), std(output), std(gradient at the output) and std(gradient at
    the input), one group of bars per network (log scale: 1 and sqrt(1000) = 31.6 both show)."""
    names = {"x": "input x", "y": "output", "dy": "gradient\nat the output",
             "dx": "gradient\nat the input"}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(demo)
    for i, (net, tensors) in enumerate(demo.items()):
        stds = [float(np.std(np.asarray(tensors[k]))) for k in names]
        bars = ax.bar(np.arange(len(names)) + (i - (len(demo) - 1) / 2) * width, stds, width,
                      label=net)
        ax.bar_label(bars, [f"{v:.2f}" for v in stds], fontsize="small")
    ax.set_xticks(np.arange(len(names)), list(names.values()))
    ax.set_yscale("log")
    _finish(ax, title + "\n(W: 1000 x 1000, x: 1000 x 1, unit Gaussians)", "tensor", "std")
    return save_figure(fig, path)


def write_diagnosis_figures(d, out, stage: str, shapes: dict | None = None) -> list[Path]:
    """Every figure of a `diagnostics.Diagnosis` into the folder `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    f, init = d.final, d.init
    thr = d.threshold
    step = f"{stage}, after {d.steps:,} steps"
    paths = [
        plot_activation_histograms(f["activations"], out / "activations.png",
                                   f"{stage}: activations after {d.steps:,} steps", thr),
        plot_gradient_histograms(f["gradients"], out / "gradients.png",
                                 f"{step}: gradient at the activations"),
        plot_weight_gradient_histograms(f["weights"], out / "weight-gradients.png", shapes,
                                        f"{step}: weight gradients"),
        plot_update_ratios(d.trace["step"], d.trace["update_ratios"], out / "update-ratios.png",
                           f"{stage}: update:data ratio per step"),
        plot_saturation({n: s["values"] for n, s in init["activations"].items()},
                        out / "saturation-init.png", thr, f"{stage} at init"),
        plot_saturation({n: s["values"] for n, s in f["activations"].items()},
                        out / "saturation.png", thr, step),
        plot_activation_histograms(init["activations"], out / "activations-init.png",
                                   f"{stage}: activations at init", thr),
        plot_loss(d.trace["losses"], out / "loss.png", f"{stage}: minibatch loss",
                  bucket=max(1, d.steps // 50)),
    ]
    if "stats" in d.trace:
        from jaxmlp.diagnosis import history

        paths.append(plot_layer_history(history(d), out / "layer-history.png",
                                        f"{stage}: activations during training"))
    return paths
