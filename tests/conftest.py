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
