# %% [markdown]
# # jaxmlp against the PyTorch lecture, step by step
#
# Runs, in one process and from the same start, the lecture's own PyTorch training loop
# (`torch_bridge.lecture_train`: the lecture's code transcribed, one thread, each step drawing
# its batch with `torch.randint` from the generator seeded 2147483647) and jaxmlp's fused JAX
# loop fed the same initial tensors and the same minibatch stream (`--torch-stream`). Prints
# both loss curves side by side at a few checkpoints with the divergence so far, then the final
# split losses of both.
#
#     PYTHONPATH=. python experiments/compare_torch.py                     # batchnorm, 5,000 steps
#     PYTHONPATH=. python experiments/compare_torch.py --stage original --steps 2000
#     PYTHONPATH=. python experiments/compare_torch.py --full              # 200,000 steps
#     PYTHONPATH=. python experiments/compare_torch.py --stage deep-nobn   # the deep network
#
# Needs torch (`pip install torch==2.13.0`, then the project with its `[torch]` extra).

# %%
import argparse
import sys
import time

import numpy as np

from jaxmlp.data import load_dataset
from jaxmlp.errors import JaxmlpError
from jaxmlp.evaluate import split_losses
from jaxmlp.stages import get_stage, make_model, stage_names
from jaxmlp.torch_bridge import (
    import_torch,
    lecture_init,
    lecture_split_loss,
    lecture_split_loss_deep,
    lecture_stream,
    lecture_train,
    lecture_train_deep,
)
from jaxmlp.train import TrainConfig, fit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="jaxmlp against the PyTorch lecture, step by step")
    p.add_argument("--stage", default="batchnorm", choices=stage_names())
    p.add_argument("--steps", type=int, default=5_000)
    p.add_argument("--full", action="store_true", help="the lecture's 200,000 steps")
    # In a notebook (or `python -i`) the kernel's own argv is not ours.
    return p.parse_args([] if argv is None and "ipykernel" in sys.modules else argv)


def checkpoints(steps: int) -> list[int]:
    """Steps to print: 0, 1, 10, 100, ... and every 10,000th, and the last."""
    marks = {0, steps - 1} | {10**k for k in range(6) if 10**k < steps}
    marks |= set(range(10_000, steps, 10_000))
    return sorted(marks)


# %%
args = parse_args()
steps = 200_000 if args.full else args.steps
try:
    torch = import_torch()
except JaxmlpError as e:
    sys.exit(f"compare_torch: error: {e}")  # one line, exit status 1
torch.set_num_threads(1)  # the lecture's figures (docs/reference.md) are single-threaded

data = load_dataset()
model = make_model(args.stage, data.vocab.size)
config = TrainConfig(steps=steps, schedule=get_stage(args.stage).schedule)
print(f"stage {args.stage}, {steps:,} steps; torch {torch.__version__} "
      f"({torch.get_num_threads()} thread)")

# %% JAX: the lecture's tensors and index stream, fused loop
state, batch_ix = lecture_stream(model, config, len(data.train.X))
jax_run = fit(state, *data.train, model, config, batch_ix=batch_ix, log=None, progress=False)
jax_us = (jax_run.seconds - jax_run.compile_seconds) / steps * 1e6

# %% PyTorch: the lecture's loop, drawing its own batches from its own generator
tensors, g = lecture_init(model)
t0 = time.perf_counter()
if args.stage.startswith("deep"):  # the lecture's Linear / BatchNorm1d / Tanh classes
    torch_losses, torch_tensors, _ = lecture_train_deep(tensors, g, *data.train, steps, model,
                                                        schedule=config.schedule)
else:
    torch_losses, torch_tensors = lecture_train(tensors, g, *data.train, steps,
                                                schedule=config.schedule)
torch_us = (time.perf_counter() - t0) / steps * 1e6

# %% Side by side, with the divergence so far
abs_diff = np.abs(jax_run.losses.astype(np.float64) - torch_losses)
rel_diff = abs_diff / np.abs(torch_losses)
max_abs, max_rel = np.maximum.accumulate(abs_diff), np.maximum.accumulate(rel_diff)
print(f"\n{'step':>7} {'PyTorch':>9} {'jaxmlp':>9} {'abs diff':>10} {'rel diff':>10} "
      f"{'max abs so far':>15} {'max rel so far':>15}")
for i in checkpoints(steps):
    print(f"{i:7d} {torch_losses[i]:9.4f} {jax_run.losses[i]:9.4f} {abs_diff[i]:10.2e} "
          f"{rel_diff[i]:10.2e} {max_abs[i]:15.2e} {max_rel[i]:15.2e}")
beyond = np.flatnonzero(rel_diff > 1e-4)
print(f"first step with a relative difference above 1e-4: {beyond[0] if beyond.size else 'none'}")

# %% Final split losses (running batch-norm statistics), and time per step
jax_split = split_losses(model, jax_run.state.variables, data)
print(f"\n{'split':>5} {'PyTorch':>9} {'jaxmlp':>9} {'diff':>9}")
for split, loss in jax_split.items():
    ref = (lecture_split_loss_deep(torch_tensors, *data.split(split), model)
           if args.stage.startswith("deep") else lecture_split_loss(torch_tensors,
                                                                   *data.split(split)))
    print(f"{split:>5} {ref:9.4f} {loss:9.4f} {round(loss - ref, 4) + 0.0:+9.4f}")
print(f"\ntime per step: PyTorch {torch_us:.0f} us, jaxmlp {jax_us:.0f} us "
      f"(+{jax_run.compile_seconds:.1f} s compile)")
