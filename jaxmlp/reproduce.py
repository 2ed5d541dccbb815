"""`jaxmlp reproduce`: the lecture's five stages end to end, beside its PyTorch figures.

    reproduce_stage   one stage: train (JAX's own init and sampler, or the lecture's torch
                      stream), then the split losses with the running batch-norm statistics
    reproduce         every stage -> {stage: {"train", "val", "test", "step_losses", "seconds"}}
    markdown_report   that, as a table beside each stage's `Reference` with the differences
    write_report      DIR/reproduce.json and DIR/reproduce.md (atomic writes)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from jaxmlp.checkpoint import write_atomic, write_json
from jaxmlp.data import Dataset
from jaxmlp.errors import ConfigError
from jaxmlp.evaluate import split_losses
from jaxmlp.report import stamp
from jaxmlp.stages import STAGES, STEP0_TOLERANCE, get_stage, make_model, stage_names
from jaxmlp.train import TrainConfig, fit

PYTORCH_STEPS = TrainConfig().steps  # the lecture's runs: its figures hold for this length
COLUMNS = ("step 0", "step 10,000", "train", "val", "test")


def reproduce_stage(stage: str, data: Dataset, *, steps: int = PYTORCH_STEPS,
                    torch_stream: bool = False, seed: int = 0,
                    log: Callable[[str], None] | None = print, progress: bool = False) -> dict:
    """Train one stage with the lecture's hyperparameters; returns its reproduce.json entry.

    torch_stream: start from the lecture's torch-drawn tensors and take its minibatch stream
    (needs torch); otherwise JAX's own init and on-device sampler from `seed`.
    """
    from jaxmlp.runs import start_state

    model = make_model(stage, data.vocab.size, block_size=data.block_size)
    config = TrainConfig(steps=steps, schedule=get_stage(stage).schedule)
    config.check_fits(model, len(data.train.Y), stream=torch_stream)
    state, batch_ix = start_state(model, config, seed=seed, torch_stream=torch_stream,
                                  n_train=len(data.train.X))
    result = fit(state, *data.train, model, config, batch_ix=batch_ix, log=log,
                 progress=progress)
    losses = split_losses(model, result.state.variables, data)
    return {**losses,
            "step_losses": {str(i): float(result.losses[i]) for i in range(0, steps, 10_000)},
            "seconds": result.seconds}


def reproduce(data: Dataset, *, stages=None, steps: int = PYTORCH_STEPS,
              torch_stream: bool = False, seed: int = 0,
              log: Callable[[str], None] | None = print, progress: bool = False) -> dict:
    """Every stage (default all five, in the lecture's order) -> {stage: reproduce_stage(...)}."""
    stages = list(STAGES) if stages is None else list(stages)
    if not stages:
        raise ConfigError("no stages to reproduce; pass --stages with at least one of "
                          f"{', '.join(stage_names())}")
    for stage in stages:
        get_stage(stage)
    results = {}
    for stage in stages:
        if log is not None:
            log(f"== {stage}")
        results[stage] = reproduce_stage(stage, data, steps=steps, torch_stream=torch_stream,
                                         seed=seed, log=log, progress=progress)
        if log is not None:
            r = results[stage]
            log(f"{stage}: train {r['train']:.4f}  val {r['val']:.4f}  test {r['test']:.4f}  "
                f"({r['seconds']:.1f} s)")
    return results


def _values(entry: dict) -> dict[str, float | None]:
    steps = entry["step_losses"]
    return {"step 0": steps.get("0"), "step 10,000": steps.get("10000"),
            "train": entry["train"], "val": entry["val"], "test": entry["test"]}


def within_tolerance(stage: str, entry: dict) -> bool:
    """Whether a full-length --torch-stream run lands on the lecture's figures: step 0 within
    STEP0_TOLERANCE, the final losses within the stage's `Reference.tolerance`."""
    ref = get_stage(stage).reference
    got = _values(entry)
    return (got["step 0"] is not None and abs(got["step 0"] - ref.step0) <= STEP0_TOLERANCE
            and all(abs(got[k] - getattr(ref, k)) <= ref.tolerance
                    for k in ("train", "val", "test")))


def markdown_report(results: dict, *, steps: int, torch_stream: bool, seed: int) -> str:
    """A Markdown table: for each stage the jaxmlp row, the PyTorch row and their difference."""
    how = ("the lecture's initial tensors and minibatch stream (`--torch-stream`)" if torch_stream
           else f"JAX's own initialisation and sampler, seed {seed}")
    s = stamp()
    lines = [
        "# jaxmlp reproduce",
        "",
        f"{steps:,} steps per stage from {how}; {s['date']}, {s['machine']} with {s['cpus']} "
        f"CPUs, JAX {s['jax']} on {s['backend']}. PyTorch: the lecture's figures "
        f"(docs/reference.md: PyTorch 2.13, {PYTORCH_STEPS:,} steps, the lecture's generator).",
        "",
        "| stage | | " + " | ".join(COLUMNS) + " | seconds |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    cell = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    for stage, entry in results.items():
        got, ref = _values(entry), get_stage(stage).reference.as_dict()
        lines.append(f"| {stage} | jaxmlp | " + " | ".join(cell(got[c]) for c in COLUMNS)
                     + f" | {entry['seconds']:.1f} |")
        lines.append("| | PyTorch | " + " | ".join(cell(ref[c]) for c in COLUMNS) + " | |")
        diff = ["–" if got[c] is None or ref[c] is None
                else f"{round(got[c] - ref[c], 4) + 0.0:+.4f}"
                for c in COLUMNS]  # + 0.0: no "-0.0000"
        lines.append("| | difference | " + " | ".join(diff) + " | |")
    lines.append("")
    if torch_stream and steps == PYTORCH_STEPS:
        verdicts = [f"{stage} {'yes' if within_tolerance(stage, e) else 'NO'}"
                    for stage, e in results.items()]
        tolerances = ", ".join(f"{st} {get_stage(st).reference.tolerance:g}" for st in results)
        lines.append(f"Within tolerance (step 0 by {STEP0_TOLERANCE:g}; final losses by "
                     f"{tolerances}): {', '.join(verdicts)}.")
    elif torch_stream:
        lines.append(f"A {steps:,}-step run: only the columns up to step {steps - 1:,} are "
                     "comparable with PyTorch's.")
    else:
        lines.append("Different random numbers from PyTorch's: expect differences of the size "
                     "of seed noise (a few thousandths on val; docs/reference.md), not zero.")
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, results: dict, *, steps: int, torch_stream: bool,
                 seed: int) -> tuple[Path, Path]:
    """Write DIR/reproduce.json and DIR/reproduce.md; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "reproduce.json", results)
    write_atomic(out / "reproduce.md", markdown_report(results, steps=steps,
                                                       torch_stream=torch_stream, seed=seed))
    return out / "reproduce.json", out / "reproduce.md"
