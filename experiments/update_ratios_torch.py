# %% [markdown]
# # Update ratios of the deep network: the lecture's PyTorch loop beside jaxmlp
#
# The lecture plots, for every 2-D parameter, log10(std(lr * grad) / std(param)) per step
# (its `ud` list) and calls about -3 healthy. This script trains the deep network for 1,000
# steps from the lecture's own initial tensors and minibatch stream twice: with the
# lecture's Linear / BatchNorm1d / Tanh classes in PyTorch (`torch_bridge.lecture_train_deep`)
# and with `jaxmlp.diagnostics.diagnose` (the update ratios recorded inside the compiled
# loop), and prints both at the last step and averaged over the last 100 steps. Needs torch.
#
#     python experiments/update_ratios_torch.py [--stage deep] [--steps 1000]

# %%
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxmlp import diagnostics as diag
from jaxmlp import torch_bridge as tb
from jaxmlp.data import load_dataset
from jaxmlp.stages import get_stage, make_model
from jaxmlp.train import TrainConfig

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--stage", default="deep", choices=("deep", "deep-nobn"))
parser.add_argument("--steps", type=int, default=1000)
args, _ = parser.parse_known_args()

data = load_dataset()
model = make_model(args.stage, data.vocab.size)
config = TrainConfig(steps=args.steps, schedule=get_stage(args.stage).schedule)

# %% PyTorch: the lecture's classes and its `ud`
tensors, g = tb.lecture_init(model)
losses, _, ud = tb.lecture_train_deep(tensors, g, *data.train, args.steps, model, ud=True)

# %% jaxmlp: the same tensors and minibatches, ratios recorded inside jit
state, batch_ix = tb.lecture_stream(model, config, len(data.train.X))
d = diag.diagnose(state, *data.train, model, config, steps=args.steps, batch_ix=batch_ix)
linears = [n for n in model.layer_names if n.startswith("linear")]
names = ["embed/embedding"] + [f"{n}/kernel" for n in linears]
ours = np.stack([d.trace["update_ratios"][n] for n in names], 1)

# %%
print(f"{args.stage}, {args.steps} steps from the lecture's torch stream; log10 update ratio")
print(f"{'parameter':18s} {'PyTorch, last':>14s} {'jaxmlp, last':>13s} "
      f"{'PyTorch, mean of last 100':>26s} {'jaxmlp':>8s}")
for j, n in enumerate(names):
    print(f"{n:18s} {ud[-1, j]:14.3f} {ours[-1, j]:13.3f} {ud[-100:, j].mean():26.3f} "
          f"{ours[-100:, j].mean():8.3f}")
print(f"largest difference over all steps and parameters: {np.abs(ud - ours).max():.1e}; "
      f"loss at the last step: PyTorch {losses[-1]:.4f}, jaxmlp {d.trace['losses'][-1]:.4f}")
