"""A ResNet with torchvision's module names (conv1, bn1, layer1..4, fc), so torchvision weights load
into it and the seed's freezing recipe (children / "layer3.0") applies unchanged. Depth and widths
are options: `resnet` with the defaults is ResNet-18; `widths: [16, 32, 64, 128]` is a CPU-sized one.
stem "cifar" (3x3 conv, no max-pool) suits 28-32 px images; "imagenet" is the 7x7/2 + max-pool stem.
"""
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, depths=(2, 2, 2, 2), widths=(64, 128, 256, 512),
                 stem="cifar"):
        super().__init__()
        if len(depths) != len(widths) or not 1 <= len(depths) <= 4:
            raise ValueError("depths and widths need the same length, 1 to 4 stages")
        if stem not in ("cifar", "imagenet"):
            raise ValueError("stem must be 'cifar' or 'imagenet'")
        # Children in torchvision's order (conv1, bn1, relu, maxpool, layer1, ...): freezing by child
        # index means the same layers here as in torchvision's resnet18.
        big = stem == "imagenet"
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7 if big else 3, 2 if big else 1, 3 if big else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if big else nn.Identity()
        cin = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = [BasicBlock(cin if j == 0 else width, width, 1 if (i == 0 or j > 0) else 2)
                      for j in range(depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width
        self.num_stages = len(depths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):                                     # (B, C, H, W)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))            # (B, num_classes)
