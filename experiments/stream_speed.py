# %% [markdown]
# # Does feeding the lecture's minibatch stream slow the fused loop?
#
# Times `train.fit` per step with `batch_ix` (the PyTorch lecture's indices, `--torch-stream`)
# against the on-device sampler, alternating the two to share the machine's noise. Needs torch.
#
#     PYTHONPATH=. python experiments/stream_speed.py [--steps 50000] [--reps 3]

# %%
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmlp.data import load_dataset
from jaxmlp.stages import make_model
from jaxmlp.torch_bridge import import_torch, lecture_stream
from jaxmlp.train import TrainConfig, create_train_state, fit

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=50_000)
p.add_argument("--reps", type=int, default=3)
p.add_argument("--stages", default="kaiming,batchnorm")
args = p.parse_args()

data = load_dataset()
import_torch()  # not part of the timing below
for stage in args.stages.split(","):
    model = make_model(stage, data.vocab.size)
    config = TrainConfig(steps=args.steps)
    t0 = time.perf_counter()
    state, batch_ix = lecture_stream(model, config, len(data.train.X))
    stream_s = time.perf_counter() - t0
    times = {"torch stream": [], "sampler": []}
    for _ in range(args.reps):
        for name in times:
            if name == "sampler":
                s, ix = create_train_state(jax.random.key(0), model, config), None
            else:
                s, ix = jax.tree.map(jnp.copy, state), batch_ix  # fit donates its state
            r = fit(s, *data.train, model, config, batch_ix=ix, log=None, progress=False)
            times[name].append((r.seconds - r.compile_seconds) / args.steps * 1e6)
    print(f"{stage}: lecture_stream (init + {args.steps:,} steps of indices) {stream_s:.2f} s; "
          f"us/step (median of {args.reps}): "
          + ", ".join(f"{k} {np.median(v):.1f}" for k, v in times.items()))
