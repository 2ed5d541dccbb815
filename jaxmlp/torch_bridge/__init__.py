"""The bridge to PyTorch, by job:

    lecture   the lecture's exact initial tensors, minibatch stream and tensor names (used to
              train a JAX run that retraces the PyTorch lecture)
    convert   any jaxmlp model as a torch.nn.Module, variables <-> state_dict (key maps for
              a state_dict of another torch model)
    modules   the torch.nn modules it builds (imports torch: import it only to use them)
    loops     the lecture's own PyTorch training loops (comparisons and the benchmark)

torch is imported inside the functions only; without it they raise TorchNotInstalledError (one
line, with the install command).
"""

from jaxmlp.torch_bridge.convert import (
    INSTALL_HINT,
    TorchNotInstalledError,
    import_torch,
    state_dict_keys,
    state_dict_to_variables,
    torch_module,
    variables_to_state_dict,
)
from jaxmlp.torch_bridge.lecture import (
    LECTURE_SEED,
    check_model,
    lecture_batches,
    lecture_init,
    lecture_stream,
    lecture_train_state,
    tensors_to_variables,
    variables_to_tensors,
)
from jaxmlp.torch_bridge.loops import (
    lecture_split_loss,
    lecture_split_loss_deep,
    lecture_train,
    lecture_train_deep,
)

__all__ = [
    "INSTALL_HINT", "LECTURE_SEED", "TorchNotInstalledError", "check_model", "import_torch",
    "lecture_batches", "lecture_init", "lecture_split_loss", "lecture_split_loss_deep",
    "lecture_stream", "lecture_train", "lecture_train_deep", "lecture_train_state",
    "state_dict_keys", "state_dict_to_variables", "tensors_to_variables", "torch_module",
    "variables_to_state_dict", "variables_to_tensors",
]
