"""Educational layers (after d2l.ai), written out with loops so a reader can see what nn.Conv2d & co.
compute: mean-centering, dense layers in a ParameterList / ParameterDict, a single-channel corr2d
convolution and pooling. tests/test_registries.py checks each against torch's own op; no script uses them.
"""
import torch
from torch import nn


class CenteredLayer(nn.Module):
    """Subtracts the mean: y = x - mean(x) (d2l.ai 6.5, a layer without parameters)."""

    def forward(self, x):
        return x - x.mean()


class DenseList(nn.Module):
    """A stack of dense layers whose parameters live in an nn.ParameterList: ReLU between layers."""

    def __init__(self, sizes):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(a, b) / a ** 0.5) for a, b in zip(sizes, sizes[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(b)) for b in sizes[1:])

    def forward(self, x):                                  # x: (B, sizes[0])
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w + b
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x                                           # (B, sizes[-1])


class DenseDict(nn.Module):
    """Named dense layers in an nn.ParameterDict; forward(x, choice) picks one ("linear1", ...)."""

    def __init__(self, shapes):
        super().__init__()
        self.params = nn.ParameterDict({name: nn.Parameter(torch.randn(*shape) / shape[0] ** 0.5)
                                        for name, shape in shapes.items()})

    def forward(self, x, choice):
        return x @ self.params[choice]


def corr2d(x, k):
    """2-D cross-correlation of one channel, with loops (d2l.ai 7.2): x (H, W), k (h, w) -> (H-h+1, W-w+1)."""
    h, w = k.shape
    y = torch.zeros(x.shape[0] - h + 1, x.shape[1] - w + 1, dtype=x.dtype)
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            y[i, j] = (x[i:i + h, j:j + w] * k).sum()
    return y


class Conv2D(nn.Module):
    """A single-channel convolution layer built on corr2d: weight (h, w) and a scalar bias."""

    def __init__(self, kernel_size):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(kernel_size))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):                                  # x: (H, W)
        return corr2d(x, self.weight) + self.bias


def pool2d(x, pool_size, mode="max"):
    """Max or average pooling with stride 1 and no padding, with loops (d2l.ai 7.5)."""
    p_h, p_w = pool_size
    y = torch.zeros(x.shape[0] - p_h + 1, x.shape[1] - p_w + 1, dtype=x.dtype)
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            window = x[i:i + p_h, j:j + p_w]
            y[i, j] = window.max() if mode == "max" else window.mean()
    return y
