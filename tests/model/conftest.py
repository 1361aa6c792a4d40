"""Model tests run single-threaded: the models are tiny, and one thread is robust on a shared 2-core box
(OpenMP workers spin badly when other processes hold the cores). The previous setting is restored."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
