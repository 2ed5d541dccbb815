"""jaxmlp: the makemore-part-3 names MLP (activations, gradients, batch norm) in JAX/Flax.

data -> models/stages -> train (optim: optimizers; protocol: what a model provides) ->
evaluate -> diagnostics/figures. `runs` trains in run directories and `checkpoint` keeps their
files; `sweep` trains many runs as one program,
`report` summarises them and `bench` times them; `torch_bridge` connects to the PyTorch
lecture; `cli` composes.
"""

# Names load on first use (PEP 562): a command imports only the modules it needs, and
# `import jaxmlp` stays as cheap as importing JAX itself.
_WHERE = {
    "checkpoint": ["Checkpoint", "RunSpec", "load_checkpoint", "load_run", "save_checkpoint",
                   "save_run"],
    "data": ["Dataset", "Split", "Vocab", "load_dataset", "load_words"],
    "diagnostics": ["diagnose", "probe", "run_diagnosed"],
    "errors": ["ConfigError", "DataError", "DivergenceError", "JaxmlpError", "RunError"],
    "evaluate": ["calibrate", "eval_loss", "evaluate_run", "sample_names", "sample_run",
                 "sample_tokens", "split_losses"],
    "init": ["calculate_gain"],
    "models": ["BN_PRESETS", "BNSemantics", "BatchNorm1d", "DeepMLP", "MLP", "probe_point"],
    "optim": ["RecordedOptimizer", "get_hyperparams", "set_hyperparams", "tunable"],
    "protocol": ["check_model"],
    "report": ["summarize"],
    "runs": ["RunPlan", "plan_new_run", "plan_resumed_run", "train_run"],
    "stages": ["DEEP_STAGES", "STAGES", "Stage", "get_stage", "make_model"],
    "sweep": ["grid_states", "seed_states", "split_losses_many", "train_many", "unstack_state"],
    "train": ["Schedule", "TrainConfig", "TrainState", "create_train_state", "fit",
              "make_optimizer", "make_schedule", "run_steps", "sample_batches", "scale_updates",
              "train_chunk", "train_step"],
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}
__version__ = "0.1.0"
__all__ = sorted(_MODULE)


def __getattr__(name: str):
    if name not in _MODULE:
        raise AttributeError(f"module 'jaxmlp' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"jaxmlp.{_MODULE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_MODULE])
