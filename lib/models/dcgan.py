"""DCGAN (Radford et al. 2016, arXiv:1511.06434): a generator of ConvTranspose2d + BatchNorm + ReLU
blocks from a latent vector (latent_dim x 1 x 1) to an image, and a discriminator of strided Conv2d +
BatchNorm + LeakyReLU(0.2) ending in one logit.

Any image side that is a base of 3..7 doubled n times works: 28 = 7 x 2^2, 32 = 4 x 2^3, 64 = 4 x 2^4.
"""
from torch import nn


def layout(image_size):
    """(base, doublings) with base * 2**doublings == image_size and 3 <= base <= 7."""
    for n in range(8, 0, -1):
        base, rest = divmod(image_size, 2 ** n)
        if rest == 0 and 3 <= base <= 7:
            return base, n
    raise ValueError(f"DCGAN needs an image side of 3..7 times a power of two (28, 32, 48, 64, ...), "
                     f"not {image_size}")


class Generator(nn.Module):
    def __init__(self, latent_dim=64, channels=1, image_size=32, features=64, output="tanh"):
        super().__init__()
        base, n = layout(image_size)
        width = features * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(latent_dim, width, base, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(n - 1):                              # base -> base * 2^(n-1), halving the width
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False),
                   {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[output]()]
        self.net = nn.Sequential(*layers)
        self.latent_dim = latent_dim

    def forward(self, z):                  # z: (B, latent_dim, 1, 1)
        return self.net(z)                 # (B, channels, image_size, image_size)


class Discriminator(nn.Module):
    def __init__(self, channels=1, image_size=32, features=64):
        super().__init__()
        base, n = layout(image_size)
        layers = [nn.Conv2d(channels, features, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]  # no BN on the input
        width = features
        for _ in range(n - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                       nn.LeakyReLU(0.2, True)]
            width *= 2
        layers += [nn.Conv2d(width, 1, base, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):                  # x: (B, channels, image_size, image_size)
        return self.net(x).flatten()       # (B,) logits
