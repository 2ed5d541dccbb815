"""`jaxmlp bench` measures everything it promises and writes every key (tiny step counts)."""

import json

import pytest

from jaxmlp import bench
from jaxmlp.cli import main

TORCH_KEYS = {"available", "reason", "version", "default_threads", "us_per_step_1_thread",
              "us_per_step_default_threads"}
SWEEP_KEYS = {"us_per_step", "us_per_model_step", "compile_seconds", "devices"}
FULL_KEYS = {"ran", "reason", "long_steps", "short_steps", "jax_wall_seconds", "jax_us_per_step",
             "torch_wall_seconds", "torch_us_per_step", "torch_threads", "torch_over_jax",
             "torch_reason"}


def check_keys(r: dict, torch: bool):
    assert {"date", "machine", "cpu", "cores", "backend", "devices", "jax", "stage", "steps",
            "torch", "jax_single", "jax_sweep", "ratios", "full", "e2e"} <= set(r)
    assert r["e2e"]["ran"] is False and "--e2e" in r["e2e"]["reason"]
    assert set(r["torch"]) == TORCH_KEYS
    assert set(r["jax_single"]) == {"us_per_step", "compile_seconds"}
    assert r["jax_single"]["us_per_step"] > 0 and r["jax_single"]["compile_seconds"] > 0
    assert list(r["jax_sweep"]) == ["1", "8", "32"]
    for k, s in r["jax_sweep"].items():
        assert set(s) == SWEEP_KEYS and s["us_per_model_step"] > 0
        assert abs(s["us_per_step"] - int(k) * s["us_per_model_step"]) < 1e-6 * s["us_per_step"]
    assert set(r["ratios"]) == {"torch_1_thread_over_jax_single", "torch_best_over_jax_single",
                                "torch_best_over_jax_sweep_k1", "torch_best_over_jax_sweep_k8",
                                "torch_best_over_jax_sweep_k32"}
    assert set(r["full"]) == FULL_KEYS and r["full"]["ran"] is False
    t = r["torch"]
    if torch:
        assert t["available"] and t["reason"] is None and t["us_per_step_1_thread"] > 0
        assert t["us_per_step_default_threads"] > 0 and t["default_threads"] >= 1
        assert all(v > 0 for v in r["ratios"].values())
    else:
        assert not t["available"] and "torch is not installed" in t["reason"]
        assert t["us_per_step_1_thread"] is None and t["us_per_step_default_threads"] is None
        assert all(v is None for v in r["ratios"].values())


def test_bench_cli_writes_every_key(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from jaxmlp import program_cache

    looked_up = []  # its compile times are compilations: no program read back from disk
    monkeypatch.setattr(program_cache, "load", lambda name: looked_up.append(name))
    out = tmp_path / "bench"
    assert main(["bench", "--steps", "30", "--torch-steps", "5", "--repeats", "1",
                 "--out", str(out)]) == 0
    assert looked_up and set(looked_up) == {None}
    check_keys(json.loads((out / "bench.json").read_text()), torch=True)
    printed = capsys.readouterr().out
    assert "PyTorch lecture loop, 1 thread" in printed and "jaxmlp sweep K=32" in printed


def test_bench_without_torch_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "torch_available", lambda: (False, bench.NO_TORCH))
    r = bench.run_bench(steps=30, repeats=1, log=None)
    check_keys(r, torch=False)
    assert "PyTorch: torch is not installed" in bench.format_table(r)


def test_torch_loop_is_the_lecture_loop():
    pytest.importorskip("torch")
    from jaxmlp.data import load_dataset

    _, losses = bench.torch_lecture_loop(*load_dataset().train, 2)
    assert round(float(losses[0]), 4) == 3.3239  # docs/reference.md: batchnorm, step 0


def test_outside_timing_has_the_same_keys(monkeypatch):
    # The --full timing, with every subprocess replaced by a fixed wall time: the keys and the
    # arithmetic (wall(long) - wall(short)) / (long - short).
    walls = iter([2.0, 8.0, 10.0, 82.0])  # jaxmlp short, long; torch short, long
    monkeypatch.setattr(bench, "_wall", lambda cmd, env=None: next(walls))
    monkeypatch.setattr(bench, "torch_available", lambda: (True, None))
    full = bench.time_full(long_steps=2_000, short_steps=200)
    assert set(full) == FULL_KEYS and full["ran"] is True
    assert abs(full["jax_us_per_step"] - 6.0 / 1800 * 1e6) < 1e-6
    assert abs(full["torch_over_jax"] - 12.0) < 1e-9


def test_bench_rejects_bad_input(tmp_path, capsys):
    assert main(["bench", "--steps", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["bench", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_end_to_end_times_each_command_in_its_own_process_cold_then_warm(monkeypatch):
    """The end-to-end section, with the clock replaced by what each command would take: a
    cold `jaxmlp train` gets a new, empty cache; the warm one the same command with that cache
    again; the ratios are those of these walls."""
    calls = []

    def fake_wall(cmd, env=None):
        calls.append((cmd, dict(env or {})))
        if cmd == bench.IMPORTS:
            return 1.0
        if "jaxmlp.lecture_torch" in cmd:
            return {"100": 4.0, "1000": 40.0}[cmd[cmd.index("--steps") + 1]]
        cache = env["JAXMLP_CACHE_DIR"]
        seen = sum(1 for c, e in calls[:-1] if e.get("JAXMLP_CACHE_DIR") == cache and c == cmd)
        steps = int(cmd[cmd.index("--steps") + 1])
        return (3.0 if seen else 5.0) + steps / 1000

    monkeypatch.setattr(bench, "_wall", fake_wall)
    monkeypatch.setattr(bench, "torch_available", lambda: (True, None))
    r = bench.time_end_to_end(1000, 100)
    trains = [(c, e) for c, e in calls if "train" in c]
    assert len(trains) == 4 and len({e["JAXMLP_CACHE_DIR"] for _, e in trains}) == 2
    assert r["jax_100"] == {"cold_seconds": 5.1, "warm_seconds": 3.1}
    assert r["jax_1000"] == {"cold_seconds": 6.0, "warm_seconds": 4.0}
    assert r["ratios"]["torch_over_jax_long_warm"] == pytest.approx(10.0)
    assert r["ratios"]["torch_over_jax_long_cold"] == pytest.approx(40 / 6)
    assert r["ratios"]["jax_short_warm_over_imports"] == pytest.approx(3.1)
    assert "end to end" in bench.format_table({**_minimal_result(), "e2e": r})


def _minimal_result():
    none = dict.fromkeys(["us_per_step_1_thread", "us_per_step_default_threads",
                          "default_threads"])
    return {"torch": {**none, "reason": None}, "jax_single": {"us_per_step": 50.0,
            "compile_seconds": 1.0}, "jax_sweep": {}, "cpu": "x", "cores": 2, "backend": "cpu",
            "jax": "0", "date": "today", "ratios": {"torch_1_thread_over_jax_single": None},
            "full": {}}
