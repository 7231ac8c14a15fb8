import pytest


@pytest.fixture(autouse=True)
def _under_both_kernel_settings(kernel_setting):
    """Every quantizer test runs on the compiled kernels and on the eager reference."""
    return kernel_setting
