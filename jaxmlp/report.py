"""Results as people read them: statistics over runs, the stamp every report carries, and the
sweep's files.

    summarize / t975          mean, std and the 95% t interval of per-run numbers
    sweep_entry               one stage's (or one (stage, lr)'s) results in sweep.json
    stamp                     date, machine, backend and versions: where a number was measured
    check_report_dir          a report's folder: new, empty, or `--force`
    sweep_markdown / write_sweep / plot_sweep   sweep.md, sweep.json and sweep.png
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from jaxmlp.checkpoint import write_atomic
from jaxmlp.errors import RunError

# Student's t, 97.5% quantile, for 1..30 degrees of freedom (the 95% two-sided interval).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile: < 1e-4 off for df > 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def summarize(values) -> dict[str, float | None]:
    """mean, sample std (ddof 1) and the half-width of the 95% t interval of the mean."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    if v.size == 1:
        return {"mean": float(v[0]), "std": None, "ci95": None, "n": 1}
    std = float(v.std(ddof=1))
    return {"mean": float(v.mean()), "std": std, "ci95": t975(v.size - 1) * std / math.sqrt(v.size),
            "n": int(v.size)}


def stamp(**extra) -> dict[str, Any]:
    """Where and when a measurement was made: date, machine, CPUs, JAX backend and version."""
    import jax

    return {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "backend": jax.default_backend(),
            "devices": jax.local_device_count(), "jax": jax.__version__, **extra}


def check_report_dir(out: Path, force: bool) -> None:
    """The folder of a command that writes results (not a run): new, empty, or `force`.

    Such commands write their own files only at the end, each atomically, and never remove
    anything: an earlier result stays whole until a new one has been computed.
    """
    try:
        is_file = out.exists() and not out.is_dir()
        busy = out.is_dir() and any(out.iterdir())
    except OSError as e:
        raise RunError(f"cannot use --out {str(out)!r} ({e.strerror}); choose another --out"
                       ) from None
    if is_file:
        raise RunError(f"--out {str(out)!r} is a file; choose a directory path")
    if busy and not force:
        raise RunError(f"--out {str(out)!r} is not empty; pass --force to overwrite its results "
                       "or choose another --out")


def sweep_entry(stage: str, seeds: list[int], rows: slice, losses: dict, result,
           steps: int, lr: float | None, fields: dict) -> dict[str, Any]:
    """One stage's (or one (stage, lr)'s) entry of sweep.json, over its seeds: rows of the
    split losses {split: (K,)} and of result (a sweep.ManyResult) are its runs."""
    from jaxmlp.stages import get_stage

    entry: dict[str, Any] = {"seeds": seeds}
    if lr is not None:
        first = get_stage(stage).schedule.learning_rates[0]
        entry.update(stage=stage, lr=lr, hyperparams={
            "lr": lr, "learning_rates": [lr / (first / r) for r in
                                         get_stage(stage).schedule.learning_rates],
            "boundaries": list(get_stage(stage).schedule.boundaries)})
    for split in ("train", "val", "test"):
        entry[split] = [float(x) for x in losses[split][rows]]
    stats = {split: summarize(entry[split]) for split in ("train", "val", "test")}
    for key in ("mean", "std", "ci95"):
        entry[key] = {split: stats[split][key] for split in stats}
    entry["n"] = stats["val"]["n"]
    entry["steps"] = steps
    entry["loss_at_step0"] = [float(x) for x in result.losses[rows, 0]] \
        if result.losses.shape[1] else []
    entry["diverged"] = [s for s, d in zip(seeds, result.diverged[rows], strict=True) if d]
    entry["seconds"] = result.seconds  # of the whole group of stages trained together
    ref = get_stage(stage).reference
    same = not fields and (lr is None or lr == get_stage(stage).schedule.learning_rates[0])
    entry["pytorch"] = {"train": ref.train, "val": ref.val, "test": ref.test} if same else None
    if fields:
        entry["model"] = fields
    return entry


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def is_grid(results: dict) -> bool:
    """Whether `results` are a learning-rate grid's (entries per (stage, lr))."""
    return any("lr" in r for r in results.values())


def sweep_markdown(results: dict, meta: dict | None = None) -> str:
    """A markdown table: mean ± std and 95% interval per stage (and learning rate, for a
    grid), beside the PyTorch figure."""
    grid = is_grid(results)
    lines = [f"| stage |{' lr |' if grid else ''} seeds | train | val (mean ± std) | val 95% CI "
             "| test | PyTorch val (1 run) | val - PyTorch |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if grid else "")]
    for stage, r in results.items():
        m, s, c = r["mean"], r["std"], r["ci95"]
        ref = (r.get("pytorch") or {}).get("val")
        diff = "-" if ref is None or m["val"] is None else f"{m['val'] - ref:+.4f}"
        ci = "-" if c["val"] is None else f"{m['val'] - c['val']:.4f} .. {m['val'] + c['val']:.4f}"
        name = f"{r['stage']} | {r['lr']:g}" if grid else stage
        lines.append(f"| {name} | {r['n']} | {_fmt(m['train'])} | {_fmt(m['val'])} ± "
                     f"{_fmt(s['val'])} | {ci} | {_fmt(m['test'])} | {_fmt(ref)} | {diff} |")
    text = "\n".join(lines) + "\n"
    if meta:
        text += "\n" + ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n"
    return text


def write_sweep(results: dict, out: Path, seconds: float) -> list[Path]:
    """sweep.json, sweep.md (with the stamp) and sweep.png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.json", json.dumps(results, indent=1) + "\n")
    write_atomic(out / "sweep.md", sweep_markdown(
        results, stamp(**{"wall seconds": round(seconds, 1)})))
    (plot_lr_sweep if is_grid(results) else plot_sweep)(results, out / "sweep.png")
    return [out / "sweep.json", out / "sweep.md", out / "sweep.png"]


def plot_sweep(results: dict, path: str | Path) -> Path:
    """Val loss per stage: each seed as a dot, the mean with its 95% interval, and the
    PyTorch lecture's single run as a red cross."""
    from jaxmlp.figures import plt, save_figure

    stages = list(results)
    fig, ax = plt.subplots(figsize=(1.6 * len(stages) + 3, 4))
    for i, stage in enumerate(stages):
        r = results[stage]
        vals = np.asarray(r["val"], np.float64)
        ax.scatter(np.full(vals.shape, i) + np.linspace(-0.3, -0.1, vals.size), vals, s=10,
                   color="0.6", zorder=2, label="seeds" if i == 0 else None)
        if r["mean"]["val"] is not None:
            ax.errorbar(i, r["mean"]["val"], yerr=r["ci95"]["val"] or 0, fmt="o", color="C0",
                        capsize=6, zorder=3, label="mean, 95% interval" if i == 0 else None)
        ref = (r.get("pytorch") or {}).get("val")
        if ref is not None:
            ax.scatter([i + 0.2], [ref], marker="x", s=60, color="C3", zorder=4,
                       label="PyTorch lecture (1 run)" if i == 0 else None)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("val loss")
    n = max(results[s]["n"] for s in stages)
    steps = max(results[s]["steps"] for s in stages)
    ax.set_title(f"val loss per stage: {n} seeds x {steps:,} steps (PyTorch: 200,000 steps)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_lr_sweep(results: dict, path: str | Path) -> Path:
    """Val loss against the learning rate (log scale), one line per stage: each seed as a dot,
    the mean with its 95% interval; the lecture's rate and its PyTorch run marked."""
    from jaxmlp.figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    stages = list(dict.fromkeys(r["stage"] for r in results.values()))
    for i, stage in enumerate(stages):
        rows = sorted((r for r in results.values() if r["stage"] == stage), key=lambda r: r["lr"])
        lrs = np.asarray([r["lr"] for r in rows])
        for r in rows:
            ax.scatter(np.full(len(r["val"]), r["lr"]), r["val"], s=8, color=f"C{i}", alpha=0.35)
        mean = [np.nan if r["mean"]["val"] is None else r["mean"]["val"] for r in rows]
        ci = [r["ci95"]["val"] or 0 for r in rows]
        ax.errorbar(lrs, mean, yerr=ci, fmt="o-", color=f"C{i}", capsize=4,
                    label=f"{stage}: mean, 95% interval")
        for r in rows:  # the lecture's run, where the grid's runs are as long as it was
            if r.get("pytorch") and r["steps"] == 200_000:
                ax.scatter([r["lr"]], [r["pytorch"]["val"]], marker="x", s=60, color="C3",
                           zorder=4, label="PyTorch lecture (1 run)" if i == 0 else None)
    ax.set_xscale("log")
    ticks = sorted({r["lr"] for r in results.values()})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("learning rate (the schedule's first)")
    ax.set_ylabel("val loss")
    r0 = next(iter(results.values()))
    ax.set_title(f"val loss against the learning rate: {r0['n']} seeds x {r0['steps']:,} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
