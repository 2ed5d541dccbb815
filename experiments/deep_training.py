# %% [markdown]
# # The deep network, trained in full
#
# Trains `deep` (batch norm) and `deep-nobn` for the lecture's 200,000 steps with
# `jaxmlp.train_run`, the code path of `jaxmlp train` (one after the other, about a minute each
# on 2 CPU cores), unless their run directories already hold finished runs, then draws both
# loss curves in one figure and writes the final losses beside the PyTorch lecture's
# (docs/reference.md, "The deep network").
#
#     python experiments/deep_training.py [--runs runs] [--out docs/figures] [--steps 200000]

# %%
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxmlp import TrainConfig, plan_new_run, train_run
from jaxmlp.figures import bucket_log10, plt, save_figure
from jaxmlp.stages import DEEP_STAGES, get_stage

# The PyTorch lecture's figures (docs/reference.md): PyTorch 2.13 CPU, 1 thread.
PYTORCH = {stage: {**s.reference.as_dict(), "seconds": s.reference.seconds}
           for stage, s in DEEP_STAGES.items()}

parser = argparse.ArgumentParser(description="Train the deep networks and plot their losses.")
parser.add_argument("--runs", type=Path, default=Path("runs"))
parser.add_argument("--out", type=Path, default=Path("docs/figures"))
parser.add_argument("--steps", type=int, default=200_000)
parser.add_argument("--seed", type=int, default=0)
args, _ = parser.parse_known_args()

# %%
results = {}
for stage in PYTORCH:
    run = args.runs / f"{stage}-s{args.seed}"
    metrics = run / "metrics.json"
    if not (metrics.is_file() and json.loads(metrics.read_text())["steps"] == args.steps):
        config = TrainConfig(steps=args.steps, schedule=get_stage(stage).schedule)
        train_run(plan_new_run(stage, seed=args.seed, config=config, out=run, force=True),
                  progress=False)
    m = json.loads(metrics.read_text())
    losses = np.load(run / "losses.npy")
    results[stage] = {"losses": losses, **{k: m[k] for k in ("train", "val", "test")},
                      "step 0": float(losses[0]), "seconds": m["seconds"],
                      "us_per_step": m["us_per_step"], "date": m.get("date"),
                      "machine": m.get("machine"), "backend": m.get("backend")}

# %%
fig, ax = plt.subplots(figsize=(9, 4))
bucket = 1000
for stage, r in results.items():
    curve = bucket_log10(r["losses"], bucket)
    ax.plot(np.arange(len(curve)) * bucket, curve,
            label=f"{stage}: val {r['val']:.4f} (PyTorch {PYTORCH[stage]['val']:.4f})")
ax.axvline(150_000, color="k", ls=":", label="learning rate 0.1 -> 0.01")
ax.set_title("the deep network: minibatch loss (mean over 1,000 steps)")
ax.set_xlabel("step")
ax.set_ylabel("log10(loss)")
ax.grid(alpha=0.3)
ax.legend()
args.out.mkdir(parents=True, exist_ok=True)
save_figure(fig, args.out / "deep-loss.png")

table = {stage: {k: v for k, v in r.items() if k != "losses"} for stage, r in results.items()}
(args.out / "deep-training.json").write_text(json.dumps(
    {"jaxmlp": table, "pytorch": PYTORCH, "steps": args.steps, "seed": args.seed}, indent=1)
    + "\n")
print("| network | | step 0 | train | val | test | time |")
print("|---|---|---|---|---|---|---|")
for stage, r in table.items():
    p = PYTORCH[stage]
    print(f"| {stage} | jaxmlp | {r['step 0']:.4f} | {r['train']:.4f} | {r['val']:.4f} | "
          f"{r['test']:.4f} | {r['seconds']:.0f} s ({r['us_per_step']:.0f} us/step) |")
    print(f"| | PyTorch | {p['step 0']:.4f} | {p['train']:.4f} | {p['val']:.4f} | "
          f"{p['test']:.4f} | {p['seconds']} s |")
