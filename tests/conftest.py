"""Session-wide test settings: one intra-op thread (the tiny models run faster so, and far faster on shared cores)."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
