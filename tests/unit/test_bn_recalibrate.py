"""train.bn_recalibrate: BatchNorm running statistics re-estimated over N train batches before an
evaluation equal the plain average of those batches' statistics (known by construction), the
momentum each layer had is kept, and ranks average theirs."""

import torch
from torch import nn

from pipeline.training import engine


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3, momentum=0.1)

    def forward(self, x):
        return {"out": self.bn(x)}


def _loader(batches):
    return [(b, torch.zeros(b.shape[0], b.shape[2], b.shape[3], dtype=torch.long)) for b in batches]


def test_running_stats_become_the_average_of_the_batches():
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(3)] + [torch.randn(4, 3, 5, 5) + 100]
    net = _Net()
    net.bn.running_mean.fill_(7.0)  # a stale estimate, far from the data
    opts = engine.StepOptions(device=torch.device("cpu"), channels_last=False)
    used = engine.recalibrate_bn(net, _loader(batches), opts, batches=3)
    assert used == 3  # the fourth batch (mean ~100) is not read
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches[:3]]).mean(0)
    variances = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches[:3]]).mean(0)
    assert torch.allclose(net.bn.running_mean, means, atol=1e-5)
    assert torch.allclose(net.bn.running_var, variances, atol=1e-4)
    assert net.bn.momentum == 0.1
    # ranks: each rank's statistics averaged (here: a fake all-reduce that halves what it gets)
    engine.recalibrate_bn(net, _loader(batches[:1]), opts, batches=1, average=lambda t: t / 2)
    assert torch.allclose(net.bn.running_mean, batches[0].mean(dim=(0, 2, 3)) / 2, atol=1e-5)
    assert engine.recalibrate_bn(net, _loader(batches), opts, batches=0) == 0
