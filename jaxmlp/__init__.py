"""jaxmlp: the makemore-part-3 names MLP (activations, gradients, batch norm) in JAX/Flax.

data -> models/stages -> train (optim: optimizers; protocol: what a model provides) ->
evaluate -> diagnostics/figures. `runs` trains in run directories and `checkpoint` keeps their
files; `sweep` trains many runs as one program,
`report` summarises them and `bench` times them; `torch_bridge` connects to the PyTorch
lecture; `cli` composes.
"""

from jaxmlp.checkpoint import (
    Checkpoint,
    RunSpec,
    load_checkpoint,
    load_run,
    save_checkpoint,
    save_run,
)
from jaxmlp.data import Dataset, Split, Vocab, load_dataset, load_words
from jaxmlp.diagnostics import diagnose, probe, run_diagnosed
from jaxmlp.errors import ConfigError, DataError, DivergenceError, JaxmlpError, RunError
from jaxmlp.evaluate import (
    calibrate,
    eval_loss,
    evaluate_run,
    sample_names,
    sample_run,
    sample_tokens,
    split_losses,
)
from jaxmlp.init import calculate_gain
from jaxmlp.models import BN_PRESETS, MLP, BatchNorm1d, BNSemantics, DeepMLP, probe_point
from jaxmlp.optim import (
    RecordedOptimizer,
    get_hyperparams,
    set_hyperparams,
    tunable,
)
from jaxmlp.protocol import check_model
from jaxmlp.report import summarize
from jaxmlp.runs import RunPlan, plan_new_run, plan_resumed_run, train_run
from jaxmlp.stages import DEEP_STAGES, STAGES, Stage, get_stage, make_model
from jaxmlp.sweep import grid_states, seed_states, split_losses_many, train_many, unstack_state
from jaxmlp.train import (
    Schedule,
    TrainConfig,
    TrainState,
    create_train_state,
    fit,
    make_optimizer,
    make_schedule,
    run_steps,
    sample_batches,
    scale_updates,
    train_chunk,
    train_step,
)

__version__ = "0.1.0"
__all__ = [
    "BN_PRESETS", "DEEP_STAGES", "MLP", "STAGES", "BNSemantics", "BatchNorm1d", "Checkpoint",
    "ConfigError", "DataError", "Dataset", "DeepMLP", "DivergenceError", "JaxmlpError",
    "RecordedOptimizer", "RunError", "RunPlan", "RunSpec", "Schedule", "Split", "Stage",
    "TrainConfig", "TrainState", "Vocab", "calculate_gain", "calibrate", "check_model",
    "create_train_state", "diagnose", "eval_loss", "evaluate_run", "fit", "get_hyperparams",
    "get_stage", "grid_states", "load_checkpoint", "load_dataset", "load_run", "load_words",
    "make_model", "make_optimizer", "make_schedule", "plan_new_run", "plan_resumed_run", "probe",
    "probe_point", "run_diagnosed", "run_steps", "sample_batches", "sample_names", "sample_run",
    "sample_tokens", "save_checkpoint", "save_run", "scale_updates", "seed_states",
    "set_hyperparams", "split_losses", "split_losses_many", "summarize", "train_chunk",
    "train_many", "train_run", "train_step", "tunable", "unstack_state",
]
