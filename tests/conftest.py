import os

# Kernels fill their outputs with NaN before computing, so unwritten elements fail the oracle.
os.environ.setdefault("SOFTTF_POISON_OUTPUTS", "1")

import pytest
import torch

import softtf_kernels


@pytest.fixture(autouse=True)
def _restore_backend():
    """Tests may switch backends; every test starts and ends on the session's setting."""
    before = softtf_kernels.get_backend()
    yield
    softtf_kernels.set_backend(before)


@pytest.fixture
def gen():
    # Fresh inputs every run; the seed is printed so pytest shows it with a failure.
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)


def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for the test: 2-core CI boxes shared with other jobs stall on OpenMP
    oversubscription. Modules that train use it with ``pytestmark = pytest.mark.usefixtures``."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def module_one_thread():
    """One torch thread for a whole module, its module-scoped fixtures (a pretrained backbone)
    included: request it from those fixtures, or ``pytestmark = pytest.mark.usefixtures``."""
    yield from _single_thread()


@pytest.fixture
def fast_switching():
    """Let the interpreter switch threads as often as it can, so thread interleavings are many."""
    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)
