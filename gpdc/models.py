"""Load the user's model from ``path/to/model.py`` (its ``build_model()``), ``torchvision:NAME`` or
``timm:NAME``, always with random weights (nothing downloads at run time)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections import OrderedDict
from pathlib import Path

from torch import nn

from .errors import GpdcError


class StateDictMismatch(RuntimeError):
    """The weights do not fit the model. Its message is one line (callers may keep only the first):
    how many keys are missing, unexpected and of another shape, with the first few of each."""


def _shape(v) -> list[int] | None:
    shape = getattr(v, "shape", None)
    return list(shape) if shape is not None else None


def describe_state_dict_mismatch(model: nn.Module, state: dict, limit: int = 10) -> str:
    """One line naming the keys ``state`` lacks, the keys it has that ``model`` does not and the shapes
    that differ (the first ``limit`` of each, with counts); ``""`` when keys and shapes all fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, _shape(state[k]), _shape(v)) for k, v in own.items()
              if k in state and _shape(state[k]) is not None and _shape(state[k]) != _shape(v)]

    def listed(items: list[str]) -> str:
        more = f", … (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} keys are missing from the file ({listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} keys of the file are not in the model ({listed(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} tensors have another shape ("
                     + listed([f"{k}: file {a}, model {b}" for k, a, b in shapes]) + ")")
    return "; ".join(parts)


def load_state_dict_strict(model: nn.Module, state: dict) -> None:
    """``load_state_dict(strict=True)`` for a plain dict (e.g. from safetensors), with the model's own
    version metadata attached (some modules, like torchvision's MNASNet, refuse a state without it).

    Weights that do not fit raise :class:`StateDictMismatch` (a ``RuntimeError``) whose one-line message
    has torch's detail: which keys are missing or unexpected and which shapes differ (first 10 of each)."""
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = describe_state_dict_mismatch(model, state)
        if not detail:  # something else torch refused: keep its whole message, on one line
            detail = " ".join(str(e).split())
        raise StateDictMismatch(detail + ".") from None


def import_user_file(path: Path, what: str = "model"):
    """Import the user's ``path`` as a module (its folder importable meanwhile), with one-line errors."""
    if path.suffix != ".py" or not path.is_file():
        raise GpdcError(f"{what} file {path} is not an existing .py file.")
    spec = importlib.util.spec_from_file_location(f"gpdc_user_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise GpdcError(f"importing {path} failed: {type(e).__name__}: {_one_line(e)}. Fix the file so `python {path}` "
                        "runs.") from None
    except SystemExit as e:
        raise GpdcError(f"importing {path} called sys.exit({e.code!r}); put script code under "
                        f"`if __name__ == \"__main__\":` so that importing the file only defines the {what}.") from None
    finally:
        sys.path.pop(0)
    return module


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
    module = import_user_file(path)
    fn = getattr(module, entry, None)
    if not callable(fn):
        raise GpdcError(f"{path} has no function '{entry}()'. Define `def {entry}(): return MyModel()` in it, "
                        "or name another function with --entry.")
    needed = _required_parameters(fn)
    if needed:
        raise GpdcError(f"{path}:{entry}() needs arguments ({', '.join(needed)}), but gpdc calls it with none. Give "
                        f"them defaults, or add a function without parameters, e.g. `def build_default(): return "
                        f"{entry}(...)`, and pass --entry build_default.")
    try:
        model = fn()
    except Exception as e:
        raise GpdcError(f"{path}:{entry}() raised {type(e).__name__}: {_one_line(e)}. Fix it so that `{entry}()` "
                        "returns the model.") from None
    except SystemExit as e:
        raise GpdcError(f"{path}:{entry}() called sys.exit({e.code!r}) (argument parsing?). Make `{entry}()` "
                        "return the model without exiting.") from None
    if not isinstance(model, nn.Module):
        raise GpdcError(f"{path}:{entry}() returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def _one_line(e: BaseException, limit: int = 500) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " …"


def _required_parameters(fn) -> list[str]:
    """Names of the parameters ``fn()`` would be missing (none for a zero-argument call)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and the like: just call it
        return []
    return [p.name for p in sig.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
