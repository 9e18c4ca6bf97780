import os

import pytest

# Tests share 2 cores with each other and with any peers they start: keep torch to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield
