"""Reading checkpoint files this run did not write itself: tensors and plain containers only.

A `.pt` file is a pickle, and unpickling can run any code the file names. Files from elsewhere (an original
OpenFlamingo `checkpoint.pt` off the hub, `checkpoint.resume_from` pointing at another run's folder, the inputs of
`tools/export_checkpoint` and `tools/generate`) are read with `torch.load(weights_only=True)`, which admits tensors,
numbers, strings and containers, plus the few library types an of_ds or DeepSpeed checkpoint holds
(`CHECKPOINT_TYPES`). A file that needs anything else is refused, naming the file, what it asked for and the opt-in
(`checkpoint.allow_pickle: true`, or `--allow-pickle` for the tools).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that needs full unpickling, which was not allowed."""


def checkpoint_types() -> list:
    """Types besides tensors and plain containers that of_ds's and DeepSpeed's checkpoint files hold: DeepSpeed's
    loss scaler, ZeRO stage enum and fragment addresses; numpy arrays and scalars of saved RNG states."""
    import numpy as np

    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    types: list = [np.ndarray, np.dtype, multiarray._reconstruct, type(np.dtype("uint32"))]  # np.random.get_state()
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        types += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # pragma: no cover - deepspeed is an install requirement
        pass
    return types


OPT_IN = "checkpoint.allow_pickle: true (tools/export_checkpoint, tools/generate: --allow-pickle)"


def load_untrusted(path: str | Path, *, allow_pickle: bool = False, opt_in: str = OPT_IN) -> Any:
    """`torch.load(path)` on the CPU with only tensors, containers and `checkpoint_types()` (or anything, when
    `allow_pickle`); a file needing more raises UnsafeCheckpointError naming it and `opt_in`."""
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(checkpoint_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "").split(". Please use")[0]
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle it ({reason}); loading it fully could run code it contains. If you trust "
            f"this file, set {opt_in}."
        ) from None


def check_checkpoint_dir(directory: str | Path, *, allow_pickle: bool = False, opt_in: str = OPT_IN) -> None:
    """Before a library (DeepSpeed) reads a checkpoint folder with full unpickling: every `.pt` file in it must load
    as `load_untrusted` allows."""
    if allow_pickle:
        return
    for f in sorted(Path(directory).rglob("*.pt")):
        load_untrusted(f, opt_in=opt_in)
