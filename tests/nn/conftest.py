import pytest

from qvit.nn.recompute import recompute_enabled, use_recompute
from qvit.quantizers.functional import fused_kernels_enabled, use_fused_kernels


@pytest.fixture(autouse=True)
def _restore_kernel_settings():
    """Tests switch recomputation and the compiled kernels per process; each test leaves them as it found them."""
    before, fused = recompute_enabled(), fused_kernels_enabled()
    yield
    use_recompute(before)
    use_fused_kernels(fused)
