"""Weights in the forms people have them: ``.safetensors``, ``torch.save``'d state_dicts, training checkpoints that
wrap one (``{'state_dict': ...}``, ``{'model': ...}``, ``{'module': ...}``, ``{'ema': ...}``), keys prefixed by
DistributedDataParallel (``module.``) or ``torch.compile`` (``_orig_mod.``). Loaded strictly: a mismatch names the
missing, unexpected and mis-shaped keys."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import GpdcError
from .models import load_state_dict_strict

WRAPPERS = ("state_dict", "model", "module", "model_ema", "ema", "state_dict_ema")  # the first that holds tensors wins
PREFIXES = ("module.", "_orig_mod.")


def load_weights(model: nn.Module, path: str, what: str) -> None:
    """Load the weights in ``path`` into ``model`` strictly (``what``: 'student', 'teacher', for messages)."""
    p = Path(path)
    if not p.is_file():
        raise GpdcError(f"{what} weights {path} do not exist.")
    try:
        raw = load_file(str(p)) if p.suffix == ".safetensors" else torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same bad input
        raise GpdcError(f"{what} weights {path} cannot be read ({type(e).__name__}); give a .safetensors file, a torch "
                        "state_dict (torch.save(model.state_dict(), path)) or a checkpoint dict that holds one under "
                        f"{', '.join(repr(w) for w in WRAPPERS)}.") from None
    state = state_dict_in(raw, set(model.state_dict()))
    if state is None:
        raise GpdcError(f"{what} weights {path} hold no state_dict: a {type(raw).__name__} without tensors at the top "
                        f"nor under {', '.join(repr(w) for w in WRAPPERS)}.")
    try:
        load_state_dict_strict(model, state)
    except RuntimeError as e:
        raise GpdcError(f"{what} weights {path} do not fit the {what} model: {str(e).splitlines()[0]} "
                        "Pass the weights written for this architecture.") from None


def state_dict_in(obj, model_keys: set[str]) -> dict[str, torch.Tensor] | None:
    """The state_dict ``obj`` is or wraps, without the wrapping prefixes the model's own keys do not have."""
    if not isinstance(obj, dict):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _unprefixed(obj, model_keys)
    for key in WRAPPERS:
        inner = state_dict_in(obj.get(key), model_keys)
        if inner is not None:
            return inner
    return None


def _unprefixed(state: dict, model_keys: set[str]) -> dict:
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in model_keys):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state
