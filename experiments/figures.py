# %% [markdown]
# # The lecture's diagnostic figures, regenerated
#
# Runs as a script (`python experiments/figures.py [--out docs/figures] [--quick]`) or cell by
# cell as a notebook (jupytext percent format). It writes every figure of docs/diagnostics.md:
#
# - the shallow net's tanh histogram and saturation map at init, for each of the five stages;
# - the deep network (with and without batch norm) after 1,000 steps: activation, gradient and
#   weight-gradient histograms, update ratios against -3, saturation maps;
# - the gain study: the deep network without batch norm at init for gains 0.5, 1, 5/3 and 3;
# - the articles' fan-in demo and Linear / Linear + BatchNorm forward-backward std demo.
#
# About a minute on 2 CPU cores (mostly compilation). `--quick` trains 100 steps, for tests.

# %%
import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxmlp import diagnosis, figures, init
from jaxmlp import diagnostics as diag
from jaxmlp.data import load_dataset
from jaxmlp.stages import STAGES, get_stage, make_model
from jaxmlp.train import TrainConfig, create_train_state

parser = argparse.ArgumentParser(description="Regenerate the diagnostic figures.")
parser.add_argument("--out", type=Path, default=Path("docs/figures"))
parser.add_argument("--quick", action="store_true", help="100 training steps instead of 1,000")
parser.add_argument("--seed", type=int, default=0)
args, _ = parser.parse_known_args()  # tolerate a notebook kernel's own arguments
STEPS = 100 if args.quick else 1000
OUT = args.out
OUT.mkdir(parents=True, exist_ok=True)
t_start = time.perf_counter()
data = load_dataset()
written = []
summary = {"steps": STEPS, "seed": args.seed}

# %% [markdown]
# ## The shallow net at init: how saturated is the tanh layer in each stage?
# One minibatch of 32 examples through the 200 tanh units; white pixels are |h| > 0.99.

# %%
values, summary["shallow"] = {}, {}
for stage in STAGES:
    model = make_model(stage, data.vocab.size)
    state = create_train_state(jax.random.key(args.seed), model, TrainConfig())
    snap = diag.snapshot(state, *data.train, model=model, threshold=diag.SHALLOW_SATURATION)
    h = snap["activations"]["h"]
    values[stage] = h["values"]
    written.append(figures.plot_saturation({"h": h["values"]}, OUT / f"shallow-{stage}-init.png",
                                           diag.SHALLOW_SATURATION, f"{stage} at init"))
    summary["shallow"][stage] = {"loss": float(snap["loss"]), "std": float(h["std"]),
                                 "saturated": float(h["saturated"]), "dead": int(h["dead"])}
written.append(figures.plot_saturation(values, OUT / "shallow-stages-init.png",
                                       diag.SHALLOW_SATURATION, "the five stages at init",
                                       sort=False))
print(json.dumps(summary["shallow"], indent=1))

# %% [markdown]
# ## The deep network after 1,000 steps, with and without batch norm
# `diagnose` trains with `compute_grads` + `apply_grads` in one `lax.scan`, recording the
# update ratio of every step, and probes a minibatch before and after.

# %%
summary["deep"] = {}
for stage in ("deep", "deep-nobn"):
    model = make_model(stage, data.vocab.size)
    config = TrainConfig(steps=STEPS, schedule=get_stage(stage).schedule)
    state = create_train_state(jax.random.key(args.seed), model, config)
    d = diag.diagnose(state, *data.train, model, config, steps=STEPS, stats_every=STEPS // 10)
    report = diagnosis.to_json(d)
    shapes = {w["name"]: w["shape"] for w in report["weights"]}
    written += figures.write_diagnosis_figures(d, OUT / stage, stage, shapes)
    summary["deep"][stage] = {
        "activations": report["activations"], "gradients": report["gradients"],
        "weights": report["weights"], "dead_units": report["dead_units"],
        "update_ratios_last": {k: v[-1] for k, v in report["update_ratios"].items()},
        "loss": report["loss"], "seconds": d.seconds}
    for a in report["activations"]:
        print(f"{stage} {a['layer']:>7s}: std {a['std']:.2f}, saturated "
              f"{100 * a['saturated']:.1f}%")

# %% [markdown]
# ## Gain study: the deep network without batch norm at init
# One set of N(0, 1) draws, scaled by each gain; `probe` vmapped over the four parameter sets.
# Too small a gain shrinks the activations layer by layer, too large a gain saturates them.

# %%
GAINS = (0.5, 1.0, 5 / 3, 3.0)
model = make_model("deep-nobn", data.vocab.size)
X, Y = data.train.X, data.train.Y
key = jax.random.key(args.seed)
params = diag.stack_inits(lambda g: make_model("deep-nobn", data.vocab.size, gain=g), GAINS, key,
                          X)
ix = np.asarray(jax.random.randint(jax.random.key(args.seed + 1), (32,), 0, len(X)))
probes = jax.device_get(diag.probe_many(params, X[ix], Y[ix], model=model))
written.append(figures.plot_gain_study(GAINS, probes, OUT / "gain-study.png"))
summary["gain_study"] = {
    f"{g:.4g}": {n: {"std": float(s["std"][j]), "saturated": float(s["saturated"][j])}
                 for n, s in diag.ordered(probes["activations"])}
    for j, g in enumerate(GAINS)}

# %% [markdown]
# ## The articles' initialisation demos

# %%
demo = init.fan_in_demo(jax.random.key(args.seed))
written.append(figures.plot_fan_in_demo(demo, OUT / "fan-in.png"))
summary["fan_in"] = {label: float(np.std(y)) for label, y in demo["outputs"].items()}
demo = init.linear_bn_demo(jax.random.key(args.seed))
written.append(figures.plot_linear_bn_demo(demo, OUT / "linear-batchnorm.png"))
summary["linear_bn"] = {net: {k: float(np.std(v)) for k, v in t.items()}
                        for net, t in demo.items()}
print(json.dumps({"fan_in": summary["fan_in"], "linear_bn": summary["linear_bn"]}, indent=1))

# %%
summary["seconds"] = time.perf_counter() - t_start
(OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"wrote {len(written)} figures and summary.json to {OUT}/ in {summary['seconds']:.0f} s")
