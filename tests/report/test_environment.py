import torch

from qvit.report import environment_info, environment_markdown


def test_environment_names_machine_and_versions():
    info = environment_info()
    assert info["torch"] == torch.__version__
    assert "cores" in info["machine"] and info["date"].endswith("UTC")
    md = environment_markdown(info)
    assert f"- torch: {torch.__version__}" in md
