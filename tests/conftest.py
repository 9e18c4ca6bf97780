import os

import pytest

# Tests share 2 cores with each other and with any peers they start: keep torch to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def procs():
    """Peer processes a test starts (tests/peerproc.PeerProc); all are killed, and must be gone, at the end."""
    from peerproc import group_alive

    started: list = []
    yield started
    for p in started:
        p.kill()
    for p in started:
        assert not group_alive(p.pid), f"{p.name} left processes behind"
