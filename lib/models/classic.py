"""The small classic networks: mlp, lenet (d2l), alexnet (d2l, 1 channel), fashion_cnn, convnet.

The convolutional ones size their first fully connected layer by a dummy forward of the input size,
so lenet runs on 32x32 CIFAR as well as on 28x28 FashionMNIST; mlp multiplies out input_shape.
"""
import torch
from torch import nn


def _flat_size(features, in_channels, image_size):
    with torch.no_grad():
        return features(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1]


def mlp(num_classes, input_shape, hidden=(256,), dropout=0.0, activation="relu"):
    """Flatten -> [Linear -> act -> Dropout] x len(hidden) -> Linear."""
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if activation not in acts:
        raise ValueError(f"activation must be one of {', '.join(acts)}")
    layers, width = [nn.Flatten()], 1
    for s in input_shape:
        width *= s
    for h in hidden:
        layers += [nn.Linear(width, h), acts[activation](), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet-5 as in d2l.ai ch. 7.6: sigmoid activations and average pooling."""

    def __init__(self, num_classes=10, in_channels=1, image_size=28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(), nn.AvgPool2d(2, 2))
        n = _flat_size(self.features, in_channels, image_size)   # 16 * 5 * 5 at 28x28
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(n, 120), nn.Sigmoid(),
                                        nn.Linear(120, 84), nn.Sigmoid(), nn.Linear(84, num_classes))

    def forward(self, x):                       # x: (B, C, H, W)
        return self.classifier(self.features(x))   # (B, num_classes)



class AlexNet(nn.Module):
    """AlexNet as in d2l.ai ch. 8.1: one input channel, 224x224 inputs, 10 classes."""

    def __init__(self, num_classes=10, in_channels=1, image_size=224, dropout=0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2))
        n = _flat_size(self.features, in_channels, image_size)   # 6400 at 224x224
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(n, 4096), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))



class FashionCNN(nn.Module):
    """The popular Kaggle FashionMNIST CNN: [conv32 -> BN -> ReLU -> pool] -> [conv64 -> BN -> ReLU -> pool]
    -> fc600 -> dropout -> fc120 -> fc. (The original stacks its fc layers without activations; we put
    ReLUs between them, which trains better at no cost.)"""

    def __init__(self, num_classes=10, in_channels=1, image_size=28, dropout=0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        n = _flat_size(self.features, in_channels, image_size)   # 64 * 6 * 6 at 28x28
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(n, 600), nn.ReLU(), nn.Dropout(dropout),
                                        nn.Linear(600, 120), nn.ReLU(), nn.Linear(120, num_classes))

    def forward(self, x):                           # (B, C, 28, 28)
        return self.classifier(self.features(x))    # (B, num_classes)



class ConvNet(nn.Module):
    """conv64 -> conv128 -> max-pool -> fc1024 -> fc (optionally with batch norm)."""

    def __init__(self, num_classes=10, in_channels=1, image_size=28, batch_norm=False, dropout=0.0):
        super().__init__()

        def block(cin, cout):
            layers = [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=not batch_norm)]
            return layers + ([nn.BatchNorm2d(cout)] if batch_norm else []) + [nn.ReLU()]

        self.features = nn.Sequential(*block(in_channels, 64), *block(64, 128), nn.MaxPool2d(2))
        n = _flat_size(self.features, in_channels, image_size)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(n, 1024), nn.ReLU(), nn.Dropout(dropout),
                                        nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
