"""Load the user's model from ``path/to/model.py`` (its ``build_model()``), ``torchvision:NAME`` or
``timm:NAME``, always with random weights (nothing downloads at run time)."""

from __future__ import annotations

import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path

from torch import nn

from .errors import GpdcError


def load_state_dict_strict(model: nn.Module, state: dict) -> None:
    """``load_state_dict(strict=True)`` for a plain dict (e.g. from safetensors), with the model's own
    version metadata attached (some modules, like torchvision's MNASNet, refuse a state without it)."""
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)


def load_model(ref: str, entry: str = "build_model", num_classes: int | None = None) -> nn.Module:
    if ref.startswith("torchvision:"):
        import torchvision

        name = ref.split(":", 1)[1]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise GpdcError(f"unknown torchvision model '{name}'; see torchvision.models.list_models() for the names "
                            "of classification models (e.g. torchvision:resnet18).")
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if ref.startswith("timm:"):
        import timm

        name = ref.split(":", 1)[1]
        if name not in timm.list_models():
            raise GpdcError(f"unknown timm model '{name}'; see timm.list_models() (e.g. timm:resnet18).")
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(name, pretrained=False, **kwargs)
    path = Path(ref)
    if path.suffix != ".py" or not path.is_file():
        raise GpdcError(f"model '{ref}' is neither an existing .py file nor 'torchvision:NAME' / 'timm:NAME'.")
    spec = importlib.util.spec_from_file_location(f"gpdc_user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise GpdcError(f"importing {path} failed: {type(e).__name__}: {e}. Fix the file so `python {path}` runs.") from None
    finally:
        sys.path.pop(0)
    fn = getattr(module, entry, None)
    if not callable(fn):
        raise GpdcError(f"{path} has no function '{entry}()'. Define `def {entry}(): return MyModel()` in it, "
                        "or name another function with --entry.")
    model = fn()
    if not isinstance(model, nn.Module):
        raise GpdcError(f"{path}:{entry}() returned {type(model).__name__}, not a torch.nn.Module.")
    return model
