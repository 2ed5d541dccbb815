"""Speed, side by side in one process: the PyTorch lecture loop against jaxmlp.

    torch_lecture_loop    the lecture's batchnorm-stage training loop, transcribed (eager)
    time_torch            its us/step at a given thread count (best of a few repeats)
    time_single           jaxmlp's single run through `fit` (us/step without compilation)
    time_sweep            `sweep.train_many` of K seeds: us per step and per model-step
    time_full             timed from outside: wall time of a full `jaxmlp train` minus that of a
                          tenth of it, per step, and the same for the PyTorch loop
    time_end_to_end       Enter to prompt: `jaxmlp train` (cold and warm compilation cache)
                          against the PyTorch lecture script and against importing JAX
    run_bench             all of them -> a dict (bench.json) and a printed table

`jaxmlp bench` and experiments/benchmark.py call `run_bench`. Timings on a shared machine are
noisy: every figure is the best of `repeats` runs, and bench.json records the machine and
date. Speed lives here, never in timed tests.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SWEEP_KS = (1, 8, 32)
NO_TORCH = "torch is not installed (pip install 'jaxmlp[torch]' to compare)"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# PyTorch


def torch_available() -> tuple[bool, str | None]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False, NO_TORCH
    return True, None


def torch_lecture_loop(Xtr: np.ndarray, Ytr: np.ndarray, steps: int, *, threads: int | None = None,
                       log_every: int = 10_000, log=None) -> tuple[float, np.ndarray]:
    """The lecture's batchnorm-stage loop (`torch_bridge.lecture_train`, from the lecture's
    initial tensors) for `steps` steps; returns (seconds of the loop alone, (steps,) losses)."""
    from jaxmlp.stages import make_model
    from jaxmlp.torch_bridge import lecture_init, lecture_train

    tensors, g = lecture_init(make_model("batchnorm", vocab_size=27, block_size=Xtr.shape[1]))
    on_step = None if log is None else (
        lambda i, loss: log(f"{i:7d}/{steps:7d}: {loss:.4f}") if i % log_every == 0 else None)
    t0 = time.perf_counter()
    losses, _ = lecture_train(tensors, g, Xtr, Ytr, steps, num_threads=threads, log=on_step)
    return time.perf_counter() - t0, losses


def time_torch(Xtr, Ytr, steps: int, threads: int, repeats: int = 3) -> float:
    """us/step of the lecture loop with `threads` threads (best of `repeats`, after a warm-up)."""
    torch_lecture_loop(Xtr, Ytr, min(steps, 50), threads=threads)
    return min(torch_lecture_loop(Xtr, Ytr, steps, threads=threads)[0]
               for _ in range(repeats)) / steps * 1e6


# ---------------------------------------------------------------------------------------------
# jaxmlp


def time_single(data, steps: int, stage: str = "batchnorm", repeats: int = 3) -> dict[str, float]:
    """jaxmlp's single run through `fit` (the code path of `jaxmlp train`): us/step without
    compilation (best of `repeats` runs of `steps` steps) and the compile time."""
    import jax

    from jaxmlp import train
    from jaxmlp.stages import make_model
    from jaxmlp.train import TrainConfig, create_train_state, fit

    model = make_model(stage, data.vocab.size, block_size=data.block_size)
    config = TrainConfig(steps=steps, chunk=min(steps, 10_000))
    train._PROGRAMS.clear()
    best, compile_s = float("inf"), None
    for _ in range(repeats):
        state = create_train_state(jax.random.key(0), model, config)
        r = fit(state, *data.train, model, config, log=None, progress=False)
        best = min(best, r.seconds - r.compile_seconds)
        compile_s = r.compile_seconds if compile_s is None else compile_s
    return {"us_per_step": best / steps * 1e6, "compile_seconds": compile_s}


def time_sweep(data, k: int, steps: int, stage: str = "batchnorm", repeats: int = 2,
               states=None) -> dict[str, float]:
    """`train_many` of seeds 0..k-1: us per (vmapped) step, per model-step, and compile time.
    `states`: the stacked initial states of at least k seeds (default: drawn here)."""
    from jaxmlp import sweep
    from jaxmlp.stages import make_model
    from jaxmlp.sweep import seed_states, sweep_chunk, take_runs, train_many
    from jaxmlp.train import TrainConfig

    model = make_model(stage, data.vocab.size, block_size=data.block_size)
    chunk = min(steps, sweep_chunk(k))
    config = TrainConfig(steps=steps, chunk=chunk)
    states = seed_states(range(k), model, config) if states is None else take_runs(states, k)
    best, compile_s, devices = float("inf"), None, None
    sweep._PROGRAMS.clear()
    for _ in range(repeats):
        r = train_many(states, *data.train, model, config, chunk=chunk)
        best = min(best, r.seconds - r.compile_seconds)
        compile_s = r.compile_seconds if compile_s is None else compile_s
        devices = r.num_devices
    return {"us_per_step": best / steps * 1e6, "us_per_model_step": best / steps / k * 1e6,
            "compile_seconds": compile_s, "devices": devices}


# ---------------------------------------------------------------------------------------------
# Timed from outside: start-up and compilation cancel out


def _wall(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def time_full(long_steps: int | None = None, short_steps: int | None = None,
              torch_threads: int = 1, data_path: str | None = None) -> dict[str, Any]:
    """(wall(long) - wall(short)) / (long - short) in us, for `jaxmlp train --stage batchnorm`
    and for the PyTorch lecture loop (each a fresh process, timed from outside). Default: the
    lecture's run length and a tenth of it."""
    from jaxmlp.train import TrainConfig

    long_steps = long_steps or TrainConfig().steps
    short_steps = short_steps or long_steps // 10
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    out: dict[str, Any] = {"ran": True, "reason": None, "long_steps": long_steps,
                           "short_steps": short_steps}
    with tempfile.TemporaryDirectory() as tmp:
        walls = {}
        for n in (short_steps, long_steps):
            cmd = [sys.executable, "-m", "jaxmlp", "train", "--stage", "batchnorm", "--steps",
                   str(n), "--out", f"{tmp}/run{n}", "--force", "--quiet"]
            if data_path:
                cmd += ["--data", data_path]
            walls[n] = _wall(cmd, env)
        out["jax_wall_seconds"] = {str(n): w for n, w in walls.items()}
        out["jax_us_per_step"] = (walls[long_steps] - walls[short_steps]) / (
            long_steps - short_steps) * 1e6
    ok, reason = torch_available()
    if ok:
        walls = {}
        for n in (short_steps, long_steps):
            cmd = [sys.executable, "-m", "jaxmlp.bench", "--torch-loop", str(n), "--threads",
                   str(torch_threads)]
            if data_path:
                cmd += ["--data", data_path]
            walls[n] = _wall(cmd, env)
        out["torch_wall_seconds"] = {str(n): w for n, w in walls.items()}
        out["torch_us_per_step"] = (walls[long_steps] - walls[short_steps]) / (
            long_steps - short_steps) * 1e6
        out["torch_threads"] = torch_threads
        out["torch_over_jax"] = out["torch_us_per_step"] / out["jax_us_per_step"]
        out["torch_reason"] = None
    else:
        out.update(torch_wall_seconds=None, torch_us_per_step=None, torch_threads=None,
                   torch_over_jax=None, torch_reason=reason)
    return out


# ---------------------------------------------------------------------------------------------
# End to end: what a user waits for, from Enter to prompt, each command in a fresh process

IMPORTS = [sys.executable, "-c", "import jax, flax, optax"]


def time_end_to_end(long_steps: int | None = None, short_steps: int | None = None,
                    torch_threads: int = 1, data_path: str | None = None, repeats: int = 1,
                    log=None) -> dict[str, Any]:
    """Wall seconds of `jaxmlp train --steps N` for N = long and short steps (default: the
    lecture's run and a hundredth of it), with a cold
    compilation cache (a new, empty one) and a warm one (the same command again), against the
    PyTorch lecture script (`python -m jaxmlp.lecture_torch`: its data preparation, loop and
    final evaluation) and against `python -c "import jax, flax, optax"`; best of `repeats`.
    """
    from jaxmlp.train import TrainConfig

    long_steps = long_steps or TrainConfig().steps
    short_steps = short_steps or long_steps // 100
    say = log or (lambda *_: None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    data = ["--data", data_path] if data_path else []
    out: dict[str, Any] = {"ran": True, "long_steps": long_steps, "short_steps": short_steps,
                           "repeats": repeats}

    def best(cmd):
        return min(_wall(cmd, env) for _ in range(repeats))

    say("end to end: python -c 'import jax, flax, optax' ...")
    out["import_seconds"] = best(IMPORTS)
    with tempfile.TemporaryDirectory() as tmp:
        for n in (short_steps, long_steps):
            cmd = [sys.executable, "-m", "jaxmlp", "train", "--stage", "batchnorm", "--steps",
                   str(n), "--out", f"{tmp}/run", "--force", "--quiet", *data]
            say(f"end to end: jaxmlp train --steps {n:,}, cold then warm cache ...")
            cold, warm = [], []
            for _ in range(repeats):
                cache = tempfile.mkdtemp(dir=tmp)
                e = {**env, "JAXMLP_CACHE_DIR": cache}
                cold.append(_wall(cmd, e))
                warm.append(_wall(cmd, e))
            out[f"jax_{n}"] = {"cold_seconds": min(cold), "warm_seconds": min(warm)}
    ok, reason = torch_available()
    out["torch_reason"] = reason
    for n in (short_steps, long_steps):
        if ok:
            say(f"end to end: the PyTorch lecture script, {n:,} steps ...")
            cmd = [sys.executable, "-m", "jaxmlp.lecture_torch", "--steps", str(n),
                   "--batch-size", str(TrainConfig().batch_size), "--threads",
                   str(torch_threads), *data]
            out[f"torch_{n}"] = {"seconds": best(cmd)}
        else:
            out[f"torch_{n}"] = {"seconds": None}
    long_, short = out[f"jax_{long_steps}"], out[f"jax_{short_steps}"]
    torch_long = out[f"torch_{long_steps}"]["seconds"]
    out["ratios"] = {
        "torch_over_jax_long_warm": torch_long / long_["warm_seconds"] if ok else None,
        "torch_over_jax_long_cold": torch_long / long_["cold_seconds"] if ok else None,
        "jax_short_warm_over_imports": short["warm_seconds"] / out["import_seconds"],
        "jax_short_cold_over_imports": short["cold_seconds"] / out["import_seconds"],
    }
    out["torch_threads"] = torch_threads if ok else None
    return out


# ---------------------------------------------------------------------------------------------
# Everything


def run_bench(steps: int = 10_000, torch_steps: int | None = None, sweep_steps: int | None = None,
              ks=SWEEP_KS, full: bool = False, data_path: str | None = None,
              repeats: int = 3, e2e_steps: tuple[int | None, int | None] | None = None,
              log=print) -> dict[str, Any]:
    """Measure everything in this process (and, with `full`, the outside timings; with
    `e2e_steps` (long, short), the end-to-end ones: `time_end_to_end`) -> dict."""
    import jax

    from jaxmlp.data import DEFAULT_DATA, load_dataset

    data = load_dataset(data_path or DEFAULT_DATA)
    torch_steps = torch_steps or min(steps, 3_000)
    sweep_steps = sweep_steps or steps
    say = log or (lambda *_: None)
    result: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "backend": jax.default_backend(), "devices": jax.local_device_count(),
        "jax": jax.__version__, "stage": "batchnorm", "steps": steps,
        "torch_steps": torch_steps, "sweep_steps": sweep_steps, "repeats": repeats,
    }
    ok, reason = torch_available()
    torch_entry: dict[str, Any] = {"available": ok, "reason": reason, "version": None,
                                   "default_threads": None, "us_per_step_1_thread": None,
                                   "us_per_step_default_threads": None}
    if ok:
        import torch

        default_threads = torch.get_num_threads()
        torch_entry.update(version=torch.__version__, default_threads=default_threads)
        say(f"PyTorch lecture loop, {torch_steps:,} steps, 1 thread ...")
        torch_entry["us_per_step_1_thread"] = time_torch(*data.train, torch_steps, 1, repeats)
        say(f"PyTorch lecture loop, {default_threads} threads ...")
        torch_entry["us_per_step_default_threads"] = time_torch(*data.train, torch_steps,
                                                                default_threads, repeats)
        torch.set_num_threads(default_threads)
    result["torch"] = torch_entry
    say(f"jaxmlp single run, {steps:,} steps ...")
    result["jax_single"] = time_single(data, steps, repeats=repeats)
    result["jax_sweep"] = {}
    from jaxmlp.stages import make_model
    from jaxmlp.sweep import seed_states
    from jaxmlp.train import TrainConfig

    # One compiled init for every K: the first k of 0..max(ks)-1.
    states = seed_states(range(max(ks)), make_model("batchnorm", data.vocab.size,
                                                    block_size=data.block_size),
                         TrainConfig(steps=sweep_steps))
    for k in ks:
        say(f"jaxmlp sweep, K = {k}, {sweep_steps:,} steps ...")
        result["jax_sweep"][str(k)] = time_sweep(data, k, sweep_steps,
                                                 repeats=max(1, repeats - 1), states=states)
    single = result["jax_single"]["us_per_step"]
    t1, td = torch_entry["us_per_step_1_thread"], torch_entry["us_per_step_default_threads"]
    best_torch = min(t1, td) if ok else None
    result["ratios"] = {
        "torch_1_thread_over_jax_single": t1 / single if ok else None,
        "torch_best_over_jax_single": best_torch / single if ok else None,
        **{f"torch_best_over_jax_sweep_k{k}": best_torch / result["jax_sweep"][str(k)][
            "us_per_model_step"] if ok else None for k in ks},
    }
    if full:
        say("outside timing: jaxmlp train and the PyTorch loop at 200,000 and 20,000 steps "
            "(minutes) ...")
        result["full"] = time_full(data_path=data_path)
    else:
        result["full"] = {"ran": False, "reason": "pass --full to time 200,000 vs 20,000 steps "
                          "from outside (minutes)", "long_steps": None, "short_steps": None,
                          "jax_wall_seconds": None, "jax_us_per_step": None,
                          "torch_wall_seconds": None, "torch_us_per_step": None,
                          "torch_threads": None, "torch_over_jax": None, "torch_reason": None}
    if e2e_steps:
        result["e2e"] = time_end_to_end(*e2e_steps, data_path=data_path, log=say)
    else:
        result["e2e"] = {"ran": False, "reason": "pass --e2e to time jaxmlp train and the "
                         "PyTorch lecture script end to end in fresh processes (minutes)"}
    return result


def _f(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def format_table(r: dict[str, Any]) -> str:
    t = r["torch"]
    rows = [("PyTorch lecture loop, 1 thread", t["us_per_step_1_thread"], None, None),
            (f"PyTorch lecture loop, {t['default_threads'] or '-'} threads (default)",
             t["us_per_step_default_threads"], None, None),
            ("jaxmlp single run (fit)", r["jax_single"]["us_per_step"], None,
             r["jax_single"]["compile_seconds"])]
    for k, s in r["jax_sweep"].items():
        rows.append((f"jaxmlp sweep K={k} ({s['devices']} device(s)), per model-step",
                     s["us_per_model_step"], s["us_per_step"], s["compile_seconds"]))
    lines = [f"batchnorm stage, {r['cpu']}, {r['cores']} cores, {r['backend']}, jax {r['jax']}, "
             f"{r['date']}",
             "| | us/step | us/vmapped step | compile s |", "|---|---|---|---|"]
    lines += [f"| {name} | {_f(us)} | {_f(vs)} | {_f(cs, 2)} |" for name, us, vs, cs in rows]
    if t["reason"]:
        lines.append(f"(PyTorch: {t['reason']})")
    ratio = r["ratios"]["torch_1_thread_over_jax_single"]
    if ratio is not None:
        lines.append(f"PyTorch (1 thread) / jaxmlp single run: {ratio:.1f}x")
    full = r["full"]
    if full.get("jax_us_per_step") is not None:
        lines.append(f"timed from outside, (200k - 20k steps) / 180k: jaxmlp train "
                     f"{_f(full['jax_us_per_step'])} us/step, PyTorch "
                     f"{_f(full['torch_us_per_step'])} us/step"
                     + (f" ({full['torch_over_jax']:.1f}x)" if full["torch_over_jax"] else ""))
    e2e = r.get("e2e", {})
    if e2e.get("ran"):
        lines += ["", "end to end (fresh processes, wall seconds):",
                  "| command | cold cache | warm cache |", "|---|---|---|",
                  f"| python -c 'import jax, flax, optax' | | {e2e['import_seconds']:.2f} |"]
        for n in (e2e["short_steps"], e2e["long_steps"]):
            j = e2e[f"jax_{n}"]
            lines.append(f"| jaxmlp train --steps {n:,} | {j['cold_seconds']:.2f} | "
                         f"{j['warm_seconds']:.2f} |")
        for n in (e2e["short_steps"], e2e["long_steps"]):
            lines.append(f"| PyTorch lecture script, {n:,} steps | | "
                         f"{_f(e2e[f'torch_{n}']['seconds'], 2)} |")
        q = e2e["ratios"]
        if q["torch_over_jax_long_warm"] is not None:
            lines.append(f"PyTorch script / jaxmlp train, {e2e['long_steps']:,} steps: "
                         f"{q['torch_over_jax_long_warm']:.1f}x warm, "
                         f"{q['torch_over_jax_long_cold']:.1f}x cold")
        lines.append(f"jaxmlp train --steps {e2e['short_steps']:,} / importing jax, flax, optax: "
                     f"{q['jax_short_warm_over_imports']:.2f}x warm, "
                     f"{q['jax_short_cold_over_imports']:.2f}x cold")
    return "\n".join(lines) + "\n"


def write_bench(result: dict[str, Any], out: str | Path) -> Path:
    from jaxmlp.checkpoint import write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "bench.json", json.dumps(result, indent=1) + "\n")
    return out / "bench.json"


def _torch_loop_main(argv: list[str]) -> int:
    """`python -m jaxmlp.bench --torch-loop N [--threads T] [--data PATH]`: the lecture loop
    alone, for timing from outside."""
    import argparse

    from jaxmlp.data import DEFAULT_DATA, load_dataset

    p = argparse.ArgumentParser(prog="python -m jaxmlp.bench")
    p.add_argument("--torch-loop", type=int, required=True, help="steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    a = p.parse_args(argv)
    data = load_dataset(a.data)
    seconds, _ = torch_lecture_loop(*data.train, a.torch_loop, threads=a.threads, log=print)
    print(f"{seconds:.1f} s, {seconds / a.torch_loop * 1e6:.1f} us/step")
    return 0


if __name__ == "__main__":
    sys.exit(_torch_loop_main(sys.argv[1:]))
