# %% [markdown]
# # makemore part 3 in JAX: activations, gradients and batch norm
#
# A companion to Andrej Karpathy's "makemore part 3" lecture that walks its path with jaxmlp:
# the same data, the same five fixes of the same character-level MLP, the same diagnostic plots
# of the deep network, and at the end the two things JAX adds: a run that retraces the PyTorch
# lecture number for number, and many seeds trained as one `vmap`. Each step is a few lines of
# jaxmlp, their real output, and a sentence on what the output shows. The PyTorch lecture's own
# figures come from `jaxmlp.stages` (provenance: [docs/reference.md](../docs/reference.md)).
#
# **Running it.** At full fidelity (the lecture's 200,000 steps for every run, 8 seeds per
# stage) executing the whole notebook takes a few minutes on a 2-core CPU, most of it the 40
# training runs; the last cell prints how long this execution took and on what machine.
# `JAXMLP_LECTURE_QUICK=1` cuts every run to a few hundred steps (about a minute, mostly
# compilation; the tests execute the notebook that way), and its numbers are then not the
# lecture's. The notebook is made from the `# %%` script
# `experiments/lecture.py` (also runnable as `python experiments/lecture.py`); to re-execute it
# and rewrite `experiments/lecture.ipynb`, from the repository root after
# `pip install -e '.[notebook]'`:
#
#     python experiments/make_notebook.py

# %%
import functools
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxmlp as jm
from jaxmlp import devices, figures, init, report
from jaxmlp import diagnostics as diag
from jaxmlp import torch_bridge as tb  # imports torch only when asked to
from jaxmlp.figures import bucket_log10, plt, save_figure
from jaxmlp.sweep import training_model

T0 = time.perf_counter()
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, in a bare kernel
# One XLA device per core, as `jaxmlp sweep` does: the 8 seeds of a stage split over the cores.
devices.configure_cpu_devices(devices.cpu_devices_for(8))
QUICK = os.environ.get("JAXMLP_LECTURE_QUICK", "") not in ("", "0")
STEPS = 300 if QUICK else 200_000  # every shallow run: the lecture trains 200,000 steps
DIAG_STEPS = 100 if QUICK else 1_000  # the deep network's diagnostics: the lecture's 1,000
SEEDS = 4 if QUICK else 8  # seeds per stage
NOTEBOOK = "ipykernel" in sys.modules
FIGURES = Path(tempfile.mkdtemp(prefix="jaxmlp-lecture-"))


def show(fig_or_path, name: str | None = None) -> None:
    """Show a figure inline in the notebook (as a PNG); in a plain script, say where it is."""
    path = fig_or_path if name is None else save_figure(fig_or_path, FIGURES / name)
    if NOTEBOOK:
        from IPython.display import Image, display

        display(Image(filename=str(path)))
    else:
        print(f"figure: {path}")


print(f"jaxmlp {jm.__version__}, JAX {jax.__version__} on {jax.devices()}; "
      f"{'QUICK mode: ' if QUICK else ''}{STEPS:,} steps per run, {SEEDS} seeds per stage")

# %% [markdown]
# ## 1. The data and its three splits
#
# Every name becomes one example per character (plus the final `.`): the three previous
# characters predict the next. The split shuffles the names with Python's own `random.seed(42)`,
# as the lecture does, so the three splits hold exactly the lecture's examples.

# %%
data = jm.load_dataset()  # the bundled data/names.txt
X, Y = data.train
print(f"vocabulary: {data.vocab.size} tokens {''.join(data.vocab.chars)!r}")
for split in ("train", "val", "test"):
    print(f"{split:>5}: X {data.split(split).X.shape} {data.split(split).X.dtype}, "
          f"Y {data.split(split).Y.shape}")
for x, y in zip(X[:5], Y[:5], strict=True):
    print(f"  {data.vocab.decode(x)!r:6} -> {data.vocab.chars[y]!r}")

# %% [markdown]
# The training split has 182,625 examples (80% of the names), validation 22,655 and test
# 22,866: the lecture's counts. `decode` drops the padding dots, so the first context of a name
# prints as `''`.
#
# ## 2. The first loss, and the softmax fix
#
# Before any training, the model should be unsure of every next character: the loss of a
# uniform guess over 27 tokens is -log(1/27). The lecture's original initialisation (every
# tensor a plain N(0, 1) draw) starts far above that.

# %%
def first_minibatch(stage: str, seed: int = 0):
    """A stage's model, its initial state for `seed`, and the minibatch of its first step."""
    model = jm.make_model(stage, data.vocab.size)
    config = jm.TrainConfig(steps=STEPS, schedule=jm.get_stage(stage).schedule)
    state = jm.create_train_state(jax.random.key(seed), model, config)
    ix = jm.sample_batches(state.key, state.step, 1, len(X), config.batch_size)[0]
    return model, config, state, X[ix], Y[ix]


print(f"uniform guess: -log(1/27) = {-math.log(1 / 27):.4f}")
for stage in ("original", "softmax-fix"):
    model, config, state, xb, yb = first_minibatch(stage)
    logits = model.apply(state.variables, xb)
    p = jax.nn.softmax(logits)[jnp.arange(len(yb)), yb]  # probability of the right character
    print(f"{stage:>11}: loss {float(-jnp.log(p).mean()):7.4f} (PyTorch lecture "
          f"{jm.get_stage(stage).reference.step0:.4f}); logits in "
          f"[{float(logits.min()):6.1f}, {float(logits.max()):5.1f}], p(right character): "
          f"median {float(jnp.median(p)):.2g}")

# %% [markdown]
# With every weight N(0, 1) the logits reach tens, the softmax is confidently wrong, and the
# right character gets a probability of almost nothing: a loss near 27 instead of 3.3 (27.24 here
# with JAX's random numbers, 27.88 in the lecture with PyTorch's). Scaling the output layer's
# weights by 0.01 and zeroing its bias (`softmax-fix`) brings the logits near 0 and the first
# loss to the uniform guess.
#
# Training shows what that costs. Every stage trains from 8 seeds at once (`train_many`: one
# compiled program, the runs split over the CPU cores; seed *s* is the run
# `jaxmlp train --seed s` makes) for the lecture's 200,000 steps, learning rate 0.1 then 0.01
# from step 100,000. The four stages without batch norm differ only in how their weights are
# drawn at init, so they train as one program of 32 runs, started here; each section below
# reads its stage's results.

# %%
runs = {}  # stage -> its 8 runs: states, every step's loss (8, STEPS), split losses (8,)


def train_stages(stages) -> None:
    """Train seeds 0..7 of every stage in `stages` as one vmapped program."""
    models = [jm.make_model(stage, data.vocab.size) for stage in stages]
    model = training_model(models[0])  # the same network without its init scales
    config = jm.TrainConfig(steps=STEPS, schedule=jm.get_stage(stages[0]).schedule)
    # Seed s of a stage starts where `jaxmlp train --seed s` does; the scales are data here.
    seeds = jnp.tile(jnp.arange(SEEDS, dtype=jnp.uint32), len(models))
    scales = {k: jnp.repeat(jnp.asarray([m.init_scales[k] for m in models]), SEEDS)
              for k in model.init_scales}
    init = jax.vmap(lambda s, f: jm.create_train_state(jax.random.key(s), model.copy(**f), config))
    result = jm.train_many(jax.jit(init)(seeds, scales), X, Y, model, config)
    losses = jm.split_losses_many(model, result.states, data)
    print(f"{', '.join(stages)}: {len(stages) * SEEDS} runs x {STEPS:,} steps in "
          f"{result.seconds:.0f} s")
    for j, stage in enumerate(stages):
        rows = slice(j * SEEDS, (j + 1) * SEEDS)
        runs[stage] = {"model": models[j], "losses": result.losses[rows],
                       "states": jax.tree.map(lambda x, rows=rows: x[rows], result.states),
                       **{split: v[rows] for split, v in losses.items()}}


def report_stage(stage: str) -> None:
    r, ref = runs[stage], jm.get_stage(stage).reference
    print(f"{stage}: seed 0 train {r['train'][0]:.4f} val {r['val'][0]:.4f} (PyTorch lecture "
          f"{ref.train:.4f} / {ref.val:.4f}); val over the {SEEDS} seeds "
          f"{r['val'].min():.4f} .. {r['val'].max():.4f}")


def plot_curves(stages, title: str, name: str, head: int | None = None):
    """log10 of seed 0's minibatch loss, averaged over buckets (the lecture's loss plot)."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for stage in stages:
        losses = runs[stage]["losses"][0, :head]
        bucket = max(1, len(losses) // 200)
        curve = bucket_log10(losses, bucket)
        ax.plot(np.arange(len(curve)) * bucket, curve, label=stage)
    ax.set(title=title, xlabel="step", ylabel="log10(loss)")
    ax.grid(alpha=0.3)
    ax.legend()
    show(fig, name)


train_stages(["original", "softmax-fix", "tanh-fix", "kaiming"])
report_stage("original")
report_stage("softmax-fix")
plot_curves(["original", "softmax-fix"], "the first 2,000 steps, seed 0", "first-steps.png",
            head=min(STEPS, 2_000))

# %% [markdown]
# The original run spends its first steps squashing its confident logits (the lecture's
# "hockey stick"): after 2,000 steps it has only come down to where the fixed run started.
# Those steps are lost to learning, and at the end the fixed run is about 0.04 lower on
# validation, as in the lecture.
#
# ## 3. Saturated tanh units, and the tanh fix
#
# The hidden layer has the same problem one level down. With W1 and b1 N(0, 1) the
# pre-activations are large, and most tanh outputs sit at -1 or 1, where the tanh's derivative
# 1 - t² is 0: those units pass almost no gradient back. `jm.probe` runs one training-mode
# forward and backward pass and returns each layer's outputs and statistics; white below is
# |t| > 0.99, one row per example of the first minibatch, one column per hidden unit.

# %%
at_init = {}
for stage in jm.STAGES:
    model, config, state, xb, yb = first_minibatch(stage)
    at_init[stage] = jm.probe(state.variables, xb, yb, model=model,
                              threshold=diag.SHALLOW_SATURATION, raw=True)["activations"]["h"]
    h = at_init[stage]
    print(f"{stage:>11}: tanh std {float(h['std']):.2f}, {100 * float(h['saturated']):4.1f}% "
          f"saturated, {int(h['dead'])} dead units (saturated for all 32 examples)")
show(figures.plot_saturation({s: at_init[s]["values"] for s in ("original", "tanh-fix")},
                             FIGURES / "saturation.png", diag.SHALLOW_SATURATION,
                             "tanh outputs at init", sort=False))

# %% [markdown]
# Two thirds of the original network's tanh outputs are saturated at init (softmax-fix does not
# touch W1, so it has the same map); scaling W1 by 0.2 and b1 by 0.01 (`tanh-fix`) leaves
# about 2%, with no dead unit. A column white for every example would be a unit that learns
# from none of them, since its gradient is zero whatever the input.

# %%
report_stage("tanh-fix")

# %% [markdown]
# With more units learning for the whole run, validation improves by another 0.03: the
# lecture's ordering, each fix better than the one before.
#
# ## 4. The fan-in demo, and Kaiming's gain
#
# The factor 0.2 was found by hand. Where should it come from? A unit Gaussian input `x`
# (1000 x 10) times a unit Gaussian weight `w` (10 x 200) gives outputs whose standard deviation
# is sqrt(fan_in) = sqrt(10), because each output sums 10 products. Dividing `w` by sqrt(fan_in)
# keeps the std at 1; Kaiming et al.'s gain on top makes up for what the non-linearity squashes
# (5/3 for tanh).

# %%
demo = init.fan_in_demo(jax.random.key(0))
for label, y in demo["outputs"].items():
    print(f"x @ ({label}): std {float(np.std(y)):.2f}")
show(figures.plot_fan_in_demo(demo, FIGURES / "fan-in.png"))
kaiming = jm.make_model("kaiming", data.vocab.size)
print(f"calculate_gain('tanh') = {jm.calculate_gain('tanh'):.4f}; the kaiming stage scales W1 "
      f"(fan_in {kaiming.block_size * kaiming.n_embd}) by "
      f"{kaiming.init_scales['w1_scale']:.4f} where tanh-fix used 0.2")

# %% [markdown]
# The output std follows the scale of `w` times sqrt(10), as the arithmetic says. For the
# lecture's first layer (fan_in = 3 x 10 = 30) Kaiming's rule gives (5/3)/sqrt(30) = 0.30: a
# principled number near the hand-tuned 0.2. In the saturation printout of section 3 it leaves
# about 13% of the outputs saturated, more than tanh-fix but still far from the original 65%.

# %%
report_stage("kaiming")

# %% [markdown]
# The rule lands within seed noise of the hand-tuned scale (the two ranges over the seeds
# overlap), and nothing had to be tuned.
#
# ## 5. Batch norm
#
# Batch norm stops caring about the scale of W1 at all: it normalises each hidden unit's
# pre-activation over the minibatch (subtract the batch mean, divide by the batch's standard
# deviation), then applies a learned gain and bias. The lecture's version uses the unbiased
# std and no epsilon; jaxmlp's `BatchNorm1d` has that as its default preset.
#
# **Training uses the batch's statistics**, so in training mode an example's output depends on
# the other examples of its batch; in eval mode it does not.

# %%
model, config, state, xb, yb = first_minibatch("batchnorm")
other = jnp.concatenate([xb[:1], X[1000:1031]])  # the same first example, 31 others
for train in (True, False):
    a = model.apply(state.variables, xb, train=train)[0]
    b = model.apply(state.variables, other, train=train)[0]
    print(f"train={train!s:5}: the first example's logits change by up to "
          f"{float(jnp.abs(a - b).max()):.2e} when the rest of the batch changes")

# %% [markdown]
# That jitter is the regulariser the lecture mentions, and the reason a trained network needs
# statistics of its own for single examples. **Those statistics live in `batch_stats`**, next to
# the parameters: the model updates them in training mode when `batch_stats` is mutable (what
# the training step does), as `0.999 running + 0.001 batch`.

# %%
train_stages(["batchnorm"])
report_stage("batchnorm")
bn_model = runs["batchnorm"]["model"]
bn_vars = jm.unstack_state(runs["batchnorm"]["states"], 0).variables  # seed 0
print(jax.tree.map(jnp.shape, bn_vars))

# %% [markdown]
# **Calibration.** Instead of the running estimates, the lecture also computes the mean and
# std over the whole training set after training. `jm.calibrate` does that in one pass; the
# two sets of statistics nearly coincide, and so do the losses.

# %%
calibrated = jm.calibrate(bn_vars, jnp.asarray(X), bn_model)
for name, variables in (("running", bn_vars), ("calibrated", calibrated)):
    losses = jm.split_losses(bn_model, variables, data)
    print(f"{name:>10} statistics: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
for ax, stat in zip(axes, ("mean", "std"), strict=True):
    run_, cal = bn_vars["batch_stats"]["bn"][stat], calibrated["batch_stats"]["bn"][stat]
    ax.scatter(cal, run_, s=8)
    ax.axline((float(cal.mean()), float(cal.mean())), slope=1, color="k", lw=0.8, ls=":")
    ax.set(title=f"{stat} of the 200 hidden units", xlabel="calibrated (whole training set)",
           ylabel="running (batch_stats)")
show(fig, "bn-statistics.png")

# %% [markdown]
# **Why the first layer lost its bias.** Adding the same vector to every row of a batch moves
# the batch mean by exactly that vector, and batch norm subtracts it again: b1 could never
# change the output, and its gradient is zero. The batch norm's own bias takes its place, which
# is why the parameter count moves from 11,897 to 12,097 (200 biases out, 200 gains and 200
# biases in).

# %%
bn = jm.BatchNorm1d()  # the lecture's preset
h = jax.random.normal(jax.random.key(1), (32, 200)) * 3
bias = jax.random.normal(jax.random.key(2), (200,))
bn_state = bn.init(jax.random.key(0), h, train=False)
out, out_shifted = bn.apply(bn_state, h, train=True), bn.apply(bn_state, h + bias, train=True)
grad_b = jax.grad(lambda b: bn.apply(bn_state, h + b, train=True).sum() ** 2)(bias)
print(f"output change from the bias: {float(jnp.abs(out - out_shifted).max()):.1e}; "
      f"its gradient: {float(jnp.abs(grad_b).max()):.1e}")
for stage in ("kaiming", "batchnorm"):
    n = sum(x.size for x in jax.tree.leaves(jm.unstack_state(runs[stage]["states"], 0).params))
    print(f"{stage}: {n:,} parameters")

# %% [markdown]
# Both are float rounding. The articles that retell the lecture add one more picture of why
# batch norm helps deep networks: through a 1000 x 1000 matrix of unit Gaussians the forward
# signal and the backward gradient both grow by sqrt(1000) = 31.6; a batch norm after the
# product brings both back to 1.

# %%
show(figures.plot_linear_bn_demo(init.linear_bn_demo(jax.random.key(0)),
                                 FIGURES / "linear-batchnorm.png"))
names = jm.sample_names(bn_model, bn_vars, data.vocab, jax.random.key(1), num=12)
print("names from the batch-norm model (seed 0):", ", ".join(names))

# %% [markdown]
# ## 6. The five stages beside the PyTorch lecture
#
# Every stage's runs side by side: the lecture's single PyTorch run, jaxmlp's seed 0, and the
# mean over the 8 seeds with its 95% interval. Seed 0 here is the run `jaxmlp train --seed 0`
# makes, so these are the numbers of the README's results table.

# %%
print(f"{'stage':>11} | {'PyTorch lecture: train / val / test':>35} | "
      f"{'jaxmlp seed 0':>24} | {SEEDS} seeds: val mean ± 95% CI | PyTorch val - mean")
seed_study = {}
for stage in jm.STAGES:
    r, ref = runs[stage], jm.get_stage(stage).reference
    val = jm.summarize(r["val"])
    seed_study[stage] = {"val": r["val"], "mean": {"val": val["mean"]},
                         "ci95": {"val": val["ci95"]}, "pytorch": {"val": ref.val},
                         "n": val["n"], "steps": STEPS}
    print(f"{stage:>11} | {ref.train:>13.4f} / {ref.val:.4f} / {ref.test:.4f} | "
          f"{r['train'][0]:.4f} / {r['val'][0]:.4f} / {r['test'][0]:.4f} | "
          f"{val['mean']:>16.4f} ± {val['ci95']:.4f} | {ref.val - val['mean']:+17.4f}")
show(report.plot_sweep(seed_study, FIGURES / "seed-study.png"))
plot_curves(jm.STAGES, "every stage, seed 0: minibatch loss", "stages.png")

# %% [markdown]
# jaxmlp's seed 0 differs from the lecture's run by a few thousandths (0.01 at most):
# different random numbers, the same model. The seed study says how much such a difference
# means. Every lecture figure lies within 0.01 of its stage's mean, the tanh-fix and kaiming
# intervals overlap (the lecture's 2.1027 vs 2.1070 cannot order them), and the lecture's
# batch-norm run sits below all eight JAX seeds: a lucky draw. In this shallow network batch
# norm does not beat a good initialisation; what it buys is not having to find one.
#
# ## 7. The deep network: activations, gradients and updates
#
# The lecture then stacks five `Linear -> BatchNorm1d -> Tanh` blocks of 100 units (`deep`) and
# compares them with the same network without batch norm and with Kaiming's 5/3 gain
# (`deep-nobn`), after 1,000 steps. `diag.diagnose` trains those steps in one `lax.scan`
# recording every step's update ratio, and probes a minibatch before and after.

# %%
deep = {}
for stage in ("deep", "deep-nobn"):
    model = jm.make_model(stage, data.vocab.size)
    config = jm.TrainConfig(steps=DIAG_STEPS, schedule=jm.get_stage(stage).schedule)
    state = jm.create_train_state(jax.random.key(0), model, config)
    deep[stage] = d = jm.diagnose(state, X, Y, model, config, steps=DIAG_STEPS)
    print(f"{stage}: {DIAG_STEPS:,} steps in {d.seconds:.1f} s, loss now "
          f"{float(d.trace['losses'][-100:].mean()):.3f} (mean of the last 100 steps)")
    for layer, a in diag.ordered(d.final["activations"]):
        g = d.final["gradients"][layer]
        print(f"  {layer:>6}: mean {float(a['mean']):+.2f}, std {float(a['std']):.2f}, "
              f"saturated {100 * float(a['saturated']):4.1f}%; gradient std "
              f"{float(g['std']):.1e}")

# %% [markdown]
# **Forward pass.** The distribution of every tanh layer's outputs (the legend gives each
# layer's mean, std and share beyond |t| > 0.97). With batch norm every layer looks the same;
# without it the gain alone holds the layers together.

# %%
for stage, d in deep.items():
    show(figures.plot_activation_histograms(d.final["activations"], FIGURES / f"{stage}-act.png",
                                            f"{stage}: activations after {DIAG_STEPS:,} steps"))

# %% [markdown]
# **Backward pass.** The gradient at each tanh output. Nothing shrinks or grows on the way back
# to the first layer in either network: the layers learn at comparable rates.

# %%
for stage, d in deep.items():
    show(figures.plot_gradient_histograms(d.final["gradients"], FIGURES / f"{stage}-grad.png",
                                          f"{stage}: gradient at the activations"))

# %% [markdown]
# **Weight gradients.** For each 2-D parameter, the gradient's distribution and its grad:data
# ratio (std of the gradient over std of the weight): a rough measure of how much one step
# changes it. The embedding C gets a far smaller ratio than the Linear weights.

# %%
for stage, d in deep.items():
    shapes = {name: w.shape for name, w in diag.flat(d.state.params).items()}
    show(figures.plot_weight_gradient_histograms(d.final["weights"],
                                                 FIGURES / f"{stage}-wgrad.png", shapes,
                                                 f"{stage}: weight gradients"))

# %% [markdown]
# **Update ratios.** What the optimizer actually did at every step: log10(std(update) /
# std(weight)), the lecture's `ud` plot with its rule of thumb of -3 (each step changes a weight
# by about a thousandth of its size).

# %%
for stage, d in deep.items():
    show(figures.plot_update_ratios(d.trace["step"], d.trace["update_ratios"],
                                    FIGURES / f"{stage}-ud.png", f"{stage}: update:data ratio"))

# %% [markdown]
# The embedding settles near -3 and the hidden weights between -2.5 and -2.2. The last Linear
# sits higher in both networks, and far higher (-1.5) without batch norm, where its weight
# starts at 0.1 of its size to make the first predictions unconfident: a small weight moves by
# a large fraction of itself. The lecture's own PyTorch run
# shows the same ([docs/diagnostics.md](../docs/diagnostics.md) compares the two step by step).
#
# **The gain study.** Without batch norm the gain is what keeps the deep network's activations
# alive: the same initial draws scaled by four gains, probed at init (`probe_many` is `probe`
# under `vmap`, one set of parameters per gain).

# %%
GAINS = (0.5, 1.0, 5 / 3, 3.0)
model = jm.make_model("deep-nobn", data.vocab.size)
params = diag.stack_inits(lambda g: jm.make_model("deep-nobn", data.vocab.size, gain=g), GAINS,
                          jax.random.key(0), X)
ix = jax.random.randint(jax.random.key(1), (32,), 0, len(X))
probes = jax.device_get(diag.probe_many(params, X[ix], Y[ix], model=model))
show(figures.plot_gain_study(GAINS, probes, FIGURES / "gain-study.png"))

# %% [markdown]
# At gain 0.5 each layer shrinks the signal (and the gradient) further; at 3 the tanh units
# saturate; at 5/3 the activations and gradients keep the same size through all five layers.
# That balance is fragile, and batch norm is what makes it unnecessary.
#
# ## 8. The same run as the PyTorch lecture, number for number
#
# With JAX's random numbers the runs above land within seed noise of the lecture, never on it.
# `jaxmlp.torch_bridge` removes the noise: it draws the lecture's initial tensors with its
# PyTorch generator (seed 2147483647) and its minibatch stream (one `torch.randint` per step),
# and the fused JAX loop consumes them. Here the batch-norm stage, whose PyTorch figures are in
# the lecture's table, and then the lecture's own PyTorch loop on the same tensors for the first
# 1,000 steps, step against step.

# %%
try:
    torch = tb.import_torch()
except tb.TorchNotInstalledError as err:
    torch = None
    print(f"Skipped: this retrace needs PyTorch. {err}")
if torch is not None:
    stage = "batchnorm"
    model = jm.make_model(stage, data.vocab.size)
    config = jm.TrainConfig(steps=STEPS, schedule=jm.get_stage(stage).schedule)
    state, batch_ix = tb.lecture_stream(model, config, len(X))  # the lecture's start and batches
    run = jm.fit(state, X, Y, model, config, batch_ix=batch_ix, log=None, progress=False)
    ref = jm.get_stage(stage).reference.as_dict()
    ours = {"step 0": run.losses[0], **jm.split_losses(model, run.state.variables, data)}
    if STEPS > 10_000:
        ours["step 10,000"] = run.losses[10_000]
    print(f"{stage}, {STEPS:,} steps from the lecture's tensors and minibatches "
          f"({run.seconds:.0f} s)")
    for key, value in ref.items():
        if key in ours and (key == "step 0" or STEPS == 200_000):
            print(f"{key:>12}: jaxmlp {ours[key]:.4f}  PyTorch lecture {value:.4f}  "
                  f"difference {round(float(ours[key]) - value, 4) + 0.0:+.4f}")
    if STEPS != 200_000:
        print("(quick mode: only the step-0 loss is comparable with the lecture's figures)")

# %% [markdown]
# Every figure agrees to the four decimals the lecture prints: the same computation in another
# framework. (The chaotic `original` stage is the exception: its saturated units amplify float
# rounding, and it ends within 0.005; [docs/pytorch.md](../docs/pytorch.md) has all five
# stages.) The lecture's own loop, transcribed in PyTorch, on the same start:

# %%
if torch is not None:
    n = min(STEPS, 1_000)
    tensors, g = tb.lecture_init(model)  # the same draws again, the generator at the 1st batch
    t0 = time.perf_counter()
    torch_losses, _ = tb.lecture_train(tensors, g, X, Y, n, schedule=config.schedule)
    torch_us = (time.perf_counter() - t0) / n * 1e6
    rel = np.abs(run.losses[:n] - torch_losses) / torch_losses
    print(f"{n:,} steps: PyTorch {torch_us:.0f} us/step (1 thread); largest relative difference "
          f"between the two loss curves {rel.max():.1e}")
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.semilogy(np.maximum(rel, 1e-9))
    ax.set(title=f"{stage}: |jaxmlp - PyTorch| / PyTorch, step by step", xlabel="step",
           ylabel="relative difference")
    ax.grid(alpha=0.3)
    show(fig, "torch-retrace.png")
else:
    print("Skipped: PyTorch is not installed (pip install torch==2.13.0, then re-execute).")

# %% [markdown]
# The two loss curves agree to float32 rounding (a few 1e-7) at every step: JAX and PyTorch sum
# in different orders, so the last bits differ, and batch norm keeps those differences from
# growing.
#
# ## 9. The functional view: eight seeds as one `vmap`
#
# Everything above is a pure function of explicit state. A `TrainState` holds the parameters,
# `batch_stats`, the optimizer state, the step and the run's key; `jm.run_steps` is N training
# steps fused in one `lax.scan`. Stacking 8 states along a leading axis and applying `jax.vmap`
# trains all 8 in one compiled program. That is what `train_many` did for every stage above
# (adding chunks and a split over the CPU cores); here it is in three lines, for the batch-norm
# stage and a shorter run.

# %%
model, n = bn_model, min(STEPS, 5_000)
config = jm.TrainConfig(steps=n)
states = jm.seed_states(range(8), model, config)  # every leaf gains a leading axis of 8
print("W1 of the 8 runs:", states.params["hidden"]["kernel"].shape)
train = functools.partial(jm.run_steps, model=model, config=config, num_steps=n)
Xd, Yd = jnp.asarray(X), jnp.asarray(Y)  # on the device, once
final, losses = jax.jit(jax.vmap(train, in_axes=(0, None, None)))(states, Xd, Yd)
print("losses:", losses.shape)
alone = jm.fit(jm.unstack_state(states, 3), X, Y, model, config, log=None, progress=False)
print(f"seed 3 trained alone vs inside the vmap: largest loss difference "
      f"{np.abs(alone.losses - np.asarray(losses[3])).max():.1e}")

# %% [markdown]
# A run inside the vmap is the run trained alone, up to float rounding. Anything that is data
# can be swept the same way; the learning rate is a multiplier `lr_scale`, so four learning
# rates for one seed are one more `vmap`:

# %%
lr_scale = jnp.array([0.1, 0.3, 1.0, 3.0])
start = jm.seed_states([0] * len(lr_scale), model, config)
_, lr_losses = jax.jit(jax.vmap(lambda s, c: train(s, Xd, Yd, lr_scale=c)))(start, lr_scale)
fig, ax = plt.subplots(figsize=(9, 3.6))
bucket = max(1, n // 100)
for c, curve in zip(lr_scale, np.asarray(lr_losses), strict=True):
    ax.plot(np.arange(len(bucket_log10(curve, bucket))) * bucket, bucket_log10(curve, bucket),
            label=f"learning rate {0.1 * float(c):.2g}")
ax.set(title=f"batchnorm, seed 0: {n:,} steps at four learning rates, one vmap",
       xlabel="step", ylabel="log10(loss)")
ax.grid(alpha=0.3)
ax.legend()
show(fig, "learning-rates.png")

# %% [markdown]
# Over these first 5,000 steps 0.01 and 0.03 lag behind, while 0.3 gains nothing on the
# lecture's 0.1 (it ends marginally higher). The same pattern scales to many devices and hosts
# ([docs/functional.md](../docs/functional.md)).

# %%
from jaxmlp.bench import cpu_name  # noqa: E402

print(f"this notebook: {time.perf_counter() - T0:.0f} s of computation "
      f"({'quick mode, ' if QUICK else ''}{STEPS:,} steps per run) on {os.cpu_count()} cores "
      f"of {cpu_name()}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
