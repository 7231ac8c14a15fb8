import os

import pytest
import torch

# Keep the suite quick and deterministic on small CPU machines.
torch.set_num_threads(int(os.environ.get("QVIT_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: the two ways the same arithmetic runs: the compiled kernels with recomputation, and the eager reference
KERNEL_SETTINGS = {"kernels": dict(fused=True, recompute=True), "eager": dict(fused=False, recompute=False)}


@pytest.fixture(params=sorted(KERNEL_SETTINGS))
def kernel_setting(request):
    """Run the test once on the compiled kernels and once on the eager reference (``qvit.settings``)."""
    import qvit
    with qvit.settings(**KERNEL_SETTINGS[request.param]):
        yield request.param
