import socket
import warnings

import pytest
import torch

from gpdc.rules.registry import scoped

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _registries():
    """Rules and leaves a test registers are gone after it, so no test depends on another's registrations."""
    with scoped():
        yield


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun master (tests: ``from conftest import free_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
