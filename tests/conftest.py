import os

import pytest
import torch

# Keep the suite quick and deterministic on small CPU machines.
torch.set_num_threads(int(os.environ.get("QVIT_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
