# %% [markdown]
# # Kaiming initialisation of a ReLU network, in jaxmlp and in PyTorch
#
# The network of the seed articles on Kaiming (He) initialisation: 784 -> 256 -> 128 -> 10 with
# ReLU between, every Linear weight drawn with `nn.init.kaiming_normal_(w, nonlinearity='relu')`,
# i.e. N(0, 2 / fan_in), the biases left at nn.Linear's default; trained with
# `nn.CrossEntropyLoss` and `torch.optim.Adam(lr=0.001)` on random (64, 784) batches.
# Here it is a Flax module with `jaxmlp.init.kaiming_normal(nonlinearity="relu")` and
# `optax.adam(1e-3)`, and the script
#
# (a) checks the initial weight statistics: each layer's weight std against sqrt(2 / fan_in),
#     jaxmlp's draws and torch's `kaiming_normal_`, over several seeds;
# (b) imports torch's exact initial weights through the bridge (`state_dict_to_variables` with
#     a key map for the nn.Sequential) and retraces torch's training on the same batches, then
#     prints the largest relative difference between the two loss curves: in float64 (both
#     frameworks), where the two must agree to far better than 1e-4, and in float32, the
#     seed's dtype, where ReLU and Adam amplify rounding (see below);
# (c) plots both loss curves and their relative differences.
#
# Why float64 as well: in float32 both frameworks compute each gradient to within rounding of
# the exact one (about 3e-7 of its scale), but summing in different orders, and two things
# turn that rounding into visible differences. A ReLU pre-activation that lands within
# rounding of zero is on in one run and off in the other, so a whole example's term enters
# one gradient and not the other; and Adam divides each gradient by its own running RMS, so
# the rounding of a near-zero gradient becomes a step of up to the learning rate. Over 200
# steps the float32 curves part by 1e-3 to 1e-2, and torch's own float32 curve parts from its
# float64 curve by as much: that is the noise floor of float32 training here, not a
# difference between the implementations. In float64 the rounding is a billion times smaller
# and the retrace itself shows.
#
# The batches are torch.randn inputs; their labels come from a fixed random linear "teacher",
# argmax(x @ T), so that there is something to learn (with random labels the loss would only
# wander around log 10).
#
#     python experiments/kaiming_relu.py [--steps 200] [--seeds 8] [--out docs/figures]

# %%
import argparse
import datetime
import itertools
import json
import math
import platform
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxmlp import torch_bridge as tb
from jaxmlp.bench import cpu_name
from jaxmlp.errors import JaxmlpError
from jaxmlp.figures import plt, save_figure
from jaxmlp.init import kaiming_normal, torch_linear_default
from jaxmlp.models import PRECISION

ROOT = Path(__file__).resolve().parent.parent

parser = argparse.ArgumentParser(description="Kaiming init of a ReLU network: jaxmlp vs torch")
parser.add_argument("--steps", type=int, default=200, help="Adam steps of the retrace")
parser.add_argument("--seeds", type=int, default=8, help="seeds of the init statistics")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
args, _ = parser.parse_known_args()  # a notebook kernel's own argv is not ours

try:
    torch = tb.import_torch()
except JaxmlpError as e:
    sys.exit(f"kaiming_relu: error: {e}")  # one line, exit status 1
# One thread: for a network this small more only wait on each other (and on a busy machine
# torch's spinning threads made a step 60 times slower).
torch.set_num_threads(1)

SIZES = (784, 256, 128, 10)


# %% The network, twice
class ReluMLP(nn.Module):
    """x (B, 784) -> logits (B, 10): Linear -> ReLU -> Linear -> ReLU -> Linear.

    Layers are named after their index in the torch nn.Sequential (linear0, linear2, linear4).
    """

    sizes: tuple[int, ...] = SIZES
    dtype: jnp.dtype = jnp.float32  # of the parameters and the computation

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(self.sizes)):
            if i > 0:
                x = jax.nn.relu(x)
            x = nn.Dense(fan_out, precision=PRECISION, dtype=self.dtype, param_dtype=self.dtype,
                         kernel_init=kaiming_normal(nonlinearity="relu"),
                         # torch's Linear keeps its own bias init, U(+-1/sqrt(fan_in))
                         bias_init=torch_linear_default(fan_in=fan_in), name=f"linear{2 * i}")(x)
        return x


def torch_relu_mlp(seed: int):
    """The seed articles' torch network, its Linear weights re-drawn with kaiming_normal_."""
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES)):
        if i > 0:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(fan_in, fan_out))
    net = torch.nn.Sequential(*layers)
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    return net


# Which key of the nn.Sequential's state_dict is which Flax variable (weights are transposed).
KEY_MAP = {"0.weight": "linear0/kernel", "0.bias": "linear0/bias",
           "2.weight": "linear2/kernel", "2.bias": "linear2/bias",
           "4.weight": "linear4/kernel", "4.bias": "linear4/bias"}
LINEARS = ["linear0", "linear2", "linear4"]

model = ReluMLP()
x0 = np.zeros((1, SIZES[0]), np.float32)

# %% (a) Initial weight statistics over seeds
stds = {"jaxmlp": np.zeros((args.seeds, 3)), "torch": np.zeros((args.seeds, 3))}
init = jax.jit(model.init)
for seed in range(args.seeds):
    params = init(jax.random.key(seed), x0)["params"]
    stds["jaxmlp"][seed] = [float(jnp.std(params[name]["kernel"])) for name in LINEARS]
    net = torch_relu_mlp(seed)
    stds["torch"][seed] = [net[2 * j].weight.std(unbiased=False).item() for j in range(3)]

print(f"(a) initial weight std over {args.seeds} seeds (mean +- std over seeds)")
print(f"{'layer':8s} {'fan_in':>6s} {'sqrt(2/fan_in)':>15s} {'jaxmlp':>18s} {'torch':>18s}")
init_ok, init_stats = True, {}
for j, name in enumerate(LINEARS):
    fan_in, fan_out = SIZES[j], SIZES[j + 1]
    target = math.sqrt(2 / fan_in)
    # A sample std of n normal draws is off by about 1/sqrt(2n) relative; allow 4 of those
    # for the mean over seeds.
    tolerance = 4 / math.sqrt(2 * fan_in * fan_out * args.seeds)
    row = {"fan_in": fan_in, "target": target, "tolerance": tolerance}
    for who, s in stds.items():
        row[who] = float(s[:, j].mean())
        init_ok &= abs(row[who] / target - 1) <= tolerance
    init_stats[name] = row
    print(f"{name:8s} {fan_in:6d} {target:15.5f} "
          + " ".join(f"{stds[w][:, j].mean():10.5f}+-{stds[w][:, j].std():.5f}" for w in stds))
print(f"initial weight std matches sqrt(2/fan_in): {'yes' if init_ok else 'NO'} "
      "(both within 4 standard errors)")

# %% (b) torch's initial weights through the bridge, then both trained on the same batches
g = torch.Generator().manual_seed(0)
teacher = torch.randn((SIZES[0], SIZES[-1]), generator=g)
xs = torch.randn((args.steps, args.batch_size, SIZES[0]), generator=g)
ys = (xs @ teacher).argmax(-1)  # (steps, batch)
initial = torch_relu_mlp(seed=0).state_dict()  # float32, as torch draws it


def train_torch(dtype) -> np.ndarray:
    """The seed's loop from `initial`: CrossEntropyLoss, Adam(lr=0.001); (steps,) losses."""
    net = torch_relu_mlp(seed=0).to(dtype)
    net.load_state_dict(initial)  # float32 -> float64 is exact
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    losses = []
    for x, y in zip(xs.to(dtype), ys, strict=True):
        opt.zero_grad()
        loss = criterion(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def train_jax(dtype) -> np.ndarray:
    """The same steps in JAX from torch's initial weights (imported with KEY_MAP)."""
    net = ReluMLP(dtype=dtype)
    template = jax.eval_shape(net.init, jax.random.key(0), x0)
    params = tb.state_dict_to_variables(initial, template, KEY_MAP)["params"]
    tx = optax.adam(1e-3)

    @jax.jit
    def train_step(params, opt_state, x, y):
        """One Adam step on a batch x (B, 784), y (B,); returns params, opt_state, loss."""

        def loss_fn(p):
            logits = net.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for x, y in zip(xs.numpy().astype(dtype), ys.numpy(), strict=True):
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
        losses.append(float(loss))
    return np.array(losses)


def rel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) / np.abs(b)


losses = {"torch float32": train_torch(torch.float32), "jaxmlp float32": train_jax(np.float32),
          "torch float64": train_torch(torch.float64)}
with jax.enable_x64(True):
    losses["jaxmlp float64"] = train_jax(np.float64)
rel = {"float64": rel_diff(losses["jaxmlp float64"], losses["torch float64"]),
       "float32": rel_diff(losses["jaxmlp float32"], losses["torch float32"]),
       "torch float32 vs float64": rel_diff(losses["torch float32"], losses["torch float64"])}

print(f"(b) retrace from torch's initial weights, {args.steps} Adam steps on the same batches; "
      f"loss at step 0: torch {losses['torch float32'][0]:.6f}, jaxmlp "
      f"{losses['jaxmlp float32'][0]:.6f}; at the last step: torch "
      f"{losses['torch float32'][-1]:.6f}, jaxmlp {losses['jaxmlp float32'][-1]:.6f}")
print(f"largest relative loss difference over {args.steps} Adam steps: "
      f"{rel['float64'].max():.2e} in float64 (both frameworks)")
print(f"float32, the seed's dtype: jaxmlp vs torch {rel['float32'].max():.2e} (first 5 steps: "
      f"{rel['float32'][:5].max():.1e}); torch float32 vs torch float64 "
      f"{rel['torch float32 vs float64'].max():.2e}")

# %% (c) Both loss curves
fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(12, 4.2))
steps = np.arange(args.steps)
ax.plot(steps, losses["torch float32"], label="PyTorch (kaiming_normal_, Adam)", lw=2.5,
        alpha=0.6)
ax.plot(steps, losses["jaxmlp float32"], "--", lw=1.2,
        label="jaxmlp (torch's initial weights, optax.adam)")
ax.set_title("784-256-128-10 ReLU network, float32: minibatch loss")
ax.set_xlabel("Adam step")
ax.set_ylabel("cross-entropy")
ax.grid(alpha=0.3)
ax.legend()
for label, r in (("jaxmlp vs torch, float64", rel["float64"]),
                 ("jaxmlp vs torch, float32", rel["float32"]),
                 ("torch float32 vs torch float64", rel["torch float32 vs float64"])):
    ax_rel.semilogy(steps, np.maximum(r, 1e-17), lw=1, label=f"{label} (max {r.max():.1e})")
ax_rel.axhline(1e-4, color="k", ls=":", label="1e-4")
ax_rel.set_title("relative loss difference")
ax_rel.set_xlabel("Adam step")
ax_rel.grid(alpha=0.3)
ax_rel.legend(fontsize=8)
args.out.mkdir(parents=True, exist_ok=True)
save_figure(fig, args.out / "kaiming-relu.png")

result = {
    "steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds,
    "init_std": init_stats, "init_ok": bool(init_ok),
    "max_rel_loss_diff": {k: float(r.max()) for k, r in rel.items()},
    "losses": {k: v.tolist() for k, v in losses.items()},
    "date": datetime.date.today().isoformat(), "machine": f"{cpu_name()} ({platform.machine()})",
    "backend": jax.default_backend(),
    "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                 "torch": torch.__version__},
}
(args.out / "kaiming-relu.json").write_text(json.dumps(result, indent=1) + "\n")
print(f"wrote {args.out / 'kaiming-relu.png'} and kaiming-relu.json")
