# %% [markdown]
# # What diagnosing costs
#
# Times N training steps of a stage without diagnostics (`train.fit`) and with them
# (`diagnostics.diagnose`: update ratios every step, layer statistics every `--stats-every`
# steps, and the two snapshots), each in a fresh process so that neither reuses the other's
# compilation. Reports wall and CPU seconds, compilation included, and the ratio.
# Then the same for the two commands end to end (`jaxmlp train` / `jaxmlp diagnose`), and
# the time per step once both loops are compiled.
#
#     python experiments/diagnose_overhead.py [--stage deep] [--steps 1000] [--repeat 3]

# %%
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(mode: str, stage: str, steps: int, stats_every: int) -> dict:
    """Runs in the child process: one timed run, compilation included."""
    sys.path.insert(0, str(ROOT))
    import jax

    from jaxmlp import diagnostics as diag
    from jaxmlp.data import load_dataset
    from jaxmlp.stages import get_stage, make_model
    from jaxmlp.train import TrainConfig, create_train_state, fit

    data = load_dataset()
    model = make_model(stage, data.vocab.size)
    config = TrainConfig(steps=steps, schedule=get_stage(stage).schedule)
    state = create_train_state(jax.random.key(0), model, config)
    jax.block_until_ready(state)
    if mode == "steady":  # once compiled: microseconds per step, best of 3
        import jax.numpy as jnp

        from jaxmlp.train import run_steps

        X, Y = jnp.asarray(data.train.X), jnp.asarray(data.train.Y)
        train = jax.jit(run_steps, static_argnames=("model", "config", "num_steps")).lower(
            state, X, Y, None, model=model, config=config, num_steps=steps).compile()
        diagnosed = diag.diagnose_chunk.lower(state, X, Y, model=model, config=config,
                                              num_steps=steps).compile()

        def best(f):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(f())
                times.append(time.perf_counter() - t0)
            return min(times) / steps * 1e6

        return {"train_us": best(lambda: train(state, X, Y, None)),
                "diagnose_us": best(lambda: diagnosed(state, X, Y))}
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if mode == "train":
        result = fit(state, *data.train, model, config, log=None, progress=False)
        jax.block_until_ready(result.state)
    else:
        diag.diagnose(state, *data.train, model, config, steps=steps, stats_every=stats_every)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": time.perf_counter() - t0,
            "cpu": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime}


def child(mode, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--stage", args.stage,
                          "--steps", str(args.steps), "--stats-every", str(args.stats_every)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def command(argv) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxmlp", *argv], check=True, capture_output=True,
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


# %%
if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Time training with and without diagnostics.")
    p.add_argument("--stage", default="deep")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--stats-every", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", choices=("train", "diagnose", "steady"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.stage, args.steps, args.stats_every)))
        sys.exit(0)
    rows = {"train": [], "diagnose": [], "cli train": [], "cli diagnose": []}
    for _ in range(args.repeat):  # interleaved, so that load changes hit both alike
        for mode in ("train", "diagnose"):
            rows[mode].append(child(mode, args))
        with tempfile.TemporaryDirectory() as tmp:
            rows["cli train"].append({"wall": command(
                ["train", "--stage", args.stage, "--steps", str(args.steps), "--quiet",
                 "--out", f"{tmp}/t"])})
            rows["cli diagnose"].append({"wall": command(
                ["diagnose", "--stage", args.stage, "--steps", str(args.steps),
                 "--stats-every", str(args.stats_every), "--out", f"{tmp}/d"])})
    best = {k: {m: min(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    steady = child("steady", args)
    print(json.dumps({"stage": args.stage, "steps": args.steps, "best_of": args.repeat,
                      **best, "steady": steady}, indent=1))
    print(f"in process: diagnose / train = {best['diagnose']['wall'] / best['train']['wall']:.2f}"
          f" (wall), {best['diagnose']['cpu'] / best['train']['cpu']:.2f} (cpu)")
    print(f"commands:   diagnose / train = "
          f"{best['cli diagnose']['wall'] / best['cli train']['wall']:.2f} (wall)")
    print(f"per step:   diagnose / train = {steady['diagnose_us']:.0f} / "
          f"{steady['train_us']:.0f} us = {steady['diagnose_us'] / steady['train_us']:.2f}")
