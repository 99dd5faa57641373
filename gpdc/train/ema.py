"""Exponential moving average of the trained parameters; evaluation swaps it in."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, params, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params) -> None:
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @contextmanager
    def swapped(self, params):
        params = list(params)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
