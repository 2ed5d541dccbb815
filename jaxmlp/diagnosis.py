"""`jaxmlp diagnose` as one library function: a short run with the lecture's diagnostics
recorded inside the compiled loop, its report (diagnostics.json) and its figures.

    run_diagnosis   stage -> DIR/diagnostics.json and the lecture's figures; returns the report
    to_json         a `diagnostics.Diagnosis` as that report (non-finite numbers become null)
    history         the layer statistics recorded during the run
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxmlp.diagnostics import (
    DEEP_SATURATION,
    SHALLOW_SATURATION,
    Diagnosis,
    check_intervals,
    diagnose,
    flat,
    ordered,
)
from jaxmlp.errors import ConfigError
from jaxmlp.limits import check_seed


def run_diagnosis(stage: str = "deep", *, steps: int = 1000, seed: int = 0,
                  batch_size: int | None = None, every: int = 1, stats_every: int = 0,
                  threshold: float | None = None, torch_stream: bool = False,
                  data=None, out: str | Path | None = None, force: bool = False,
                  log: Callable[[str], None] | None = print, **model_fields) -> dict[str, Any]:
    """Train `stage` for `steps` steps with diagnostics and write DIR/diagnostics.json and the
    lecture's figures (DIR default runs/diagnose-<stage>-s<seed>, or -torch); returns the
    report. threshold: saturation of |tanh| (default 0.97 deep, 0.99 shallow).
    model_fields: the deep network's variants (norm, activation, gain, depth), as `make_model`
    takes them (recorded as "model" in the report)."""
    import jax

    from jaxmlp.checkpoint import write_json
    from jaxmlp.data import DEFAULT_DATA, load_dataset
    from jaxmlp.evaluate import split_losses
    from jaxmlp.report import check_report_dir, stamp
    from jaxmlp.runs import start_state
    from jaxmlp.stages import DEEP_STAGES, get_stage, make_model
    from jaxmlp.train import TrainConfig

    schedule = get_stage(stage).schedule
    check_seed(seed)
    if threshold is None:
        threshold = DEEP_SATURATION if stage in DEEP_STAGES else SHALLOW_SATURATION
    if not 0 < threshold < 1:
        raise ConfigError(f"--threshold must lie strictly between 0 and 1, got {threshold}")
    check_intervals(steps, every, stats_every)
    make_model(stage, 1, block_size=1, **model_fields)  # the variants, before anything else
    config = TrainConfig(steps=steps, schedule=schedule,
                         **({} if batch_size is None else {"batch_size": batch_size}))
    if torch_stream:
        from jaxmlp.torch_bridge import import_torch

        import_torch()  # fail before anything else when torch is missing
    out = Path(out or f"runs/diagnose-{stage}-{'torch' if torch_stream else f's{seed}'}")
    check_report_dir(out, force)
    data = load_dataset(data or DEFAULT_DATA)
    model = make_model(stage, data.vocab.size, block_size=data.block_size, **model_fields)
    config.check_fits(model, len(data.train.Y), stream=torch_stream)
    # The lecture's stream: one minibatch more, the final snapshot's.
    longer = dataclasses.replace(config, steps=steps + 1) if torch_stream else config
    state, batch_ix = start_state(model, longer, seed=seed, torch_stream=torch_stream,
                                  n_train=len(data.train.X))
    where = "the lecture's torch stream" if torch_stream else f"seed {seed}"
    if log:
        log(f"diagnosing {stage} for {steps:,} steps ({where}, on {jax.devices()[0].platform})")
    d = diagnose(state, *data.train, model, config, steps=steps, every=every,
                 stats_every=stats_every, threshold=threshold, batch_ix=batch_ix)
    losses = split_losses(model, d.state.variables, data, splits=("train", "val"))
    report = to_json(d, stage=stage, seed=seed, split_losses=losses, torch_stream=torch_stream,
                     **({"model": model_fields} if model_fields else {}), **stamp())
    out.mkdir(parents=True, exist_ok=True)
    from jaxmlp.figures import write_diagnosis_figures

    shapes = {w["name"]: w["shape"] for w in report["weights"]}
    figures = write_diagnosis_figures(d, out, stage, shapes)
    write_json(out / "diagnostics.json", report)
    if log:
        for a in report["activations"]:
            log(f"{a['layer']:>7s}: mean {a['mean']:+.2f}, std {a['std']:.2f}, saturated "
                f"{100 * a['saturated']:.2f}%, dead {report['dead_units'][a['layer']]}")
        log(f"train {losses['train']:.4f}  val {losses['val']:.4f}  ({d.seconds:.1f} s, "
            f"{d.compile_seconds:.1f} s compiling)")
        log(f"wrote {out}/diagnostics.json and {len(figures)} figures")
    return report


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None  # JSON has no NaN/Infinity


def to_json(d: Diagnosis, **extra) -> dict[str, Any]:
    """The diagnostics.json report of `jaxmlp diagnose` (non-finite numbers become null)."""
    f = d.final
    shapes = {n: list(np.shape(v)) for n, v in flat(d.state.params).items()}
    out = {
        "step": d.steps,
        "activations": [{"layer": n, "mean": _num(s["mean"]), "std": _num(s["std"]),
                         "saturated": _num(s["saturated"])} for n, s in ordered(f["activations"])],
        "gradients": [{"layer": n, "mean": _num(s["mean"]), "std": _num(s["std"])}
                      for n, s in ordered(f["gradients"])],
        "weights": [{"name": n, "shape": shapes[n],
                     "grad_mean": _num(s["grad_mean"]), "grad_std": _num(s["grad_std"]),
                     "grad_data_ratio": _num(s["grad_data_ratio"])}
                    for n, s in ordered(f["weights"])],
        "update_ratios": {n: [_num(v) for v in vals]
                          for n, vals in ordered(d.trace["update_ratios"])},
        "dead_units": {n: int(s["dead"]) for n, s in ordered(f["activations"])},
    }
    out.update({
        "saturation_threshold": d.threshold,
        "every": d.every,
        "update_ratio_steps": [int(s) for s in d.trace["step"]],
        "loss": _num(f["loss"]),
        "init": {"loss": _num(d.init["loss"]),
                 "activations": [{"layer": n, "mean": _num(s["mean"]), "std": _num(s["std"]),
                                  "saturated": _num(s["saturated"]), "dead": int(s["dead"])}
                                 for n, s in ordered(d.init["activations"])]},
        "history": history(d),
        "seconds": d.seconds,
        "compile_seconds": d.compile_seconds,
        **extra,
    })
    return out


def history(d: Diagnosis) -> dict[str, Any]:
    """Layer statistics recorded during the run: {'step': [...], layer: {stat: [...]}}."""
    if "stats" not in d.trace:
        return {"step": []}
    keep = np.asarray(d.trace["has_stats"], bool)
    stats = d.trace["stats"]
    out: dict[str, Any] = {"step": [int(s) for s in np.asarray(d.trace["step"])[keep]],
                           "loss": [_num(v) for v in np.asarray(stats["loss"])[keep]]}
    for kind in ("activations", "gradients"):
        out[kind] = {n: {k: [_num(v) for v in np.asarray(vals)[keep]] for k, vals in s.items()}
                     for n, s in ordered(stats[kind])}
    return out
