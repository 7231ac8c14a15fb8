"""Batch-norm re-estimation."""
import pytest
import torch
import torch.nn as nn

from qvit.qat import reestimate_bn


def test_reestimated_statistics_are_the_batch_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.5)).eval()
    model[1].running_mean.fill_(5.0)
    batches = [torch.randn(4, 2, 5, 5) * (i + 1) for i in range(3)]
    assert reestimate_bn(model, batches, num_batches=2) == 2
    with torch.no_grad():
        feats = [model[0](b) for b in batches[:2]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert model[1].momentum == 0.1 and not model.training      # restored


def test_models_without_batchnorm_and_empty_data():
    assert reestimate_bn(nn.Linear(2, 2), [torch.randn(1, 2)]) == 0
    with pytest.raises(ValueError, match="no batches"):
        reestimate_bn(nn.Sequential(nn.BatchNorm1d(2)), [])
