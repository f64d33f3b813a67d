"""Any torchvision classification model as `torchvision:<name>` (resnet18, mobilenet_v3_small, ...).

num_classes sizes the head; in_channels != 3 rebuilds the first convolution; `cifar_stem: true`
gives ResNets a 3x3 stride-1 first conv and no max-pool, for 32x32 images. torchvision is imported
only when such a model is asked for (it costs ~1.5 s).
"""
import functools

from torch import nn


@functools.lru_cache(maxsize=1)
def torchvision_names():
    import torchvision.models as tvm
    return tuple(sorted(tvm.list_models(module=tvm)))


def build_torchvision(name, num_classes, in_channels=3, cifar_stem=False, **kwargs):
    import torchvision.models as tvm
    model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    if cifar_stem:
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
            raise ValueError("cifar_stem applies to ResNet-style models (conv1 + maxpool) only")
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def replace_first_conv(model, in_channels, keep_weights=True):
    """Rebuild the first Conv2d for `in_channels`; with keep_weights its filters are the old ones averaged
    over their input channels, tiled and scaled by 3 / in_channels."""
    import torch
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, child.groups if child.groups == 1 else in_channels,
                                child.bias is not None, child.padding_mode)
                if keep_weights:
                    with torch.no_grad():
                        w = child.weight.mean(1, keepdim=True)                  # (out, 1, k, k)
                        new.weight.copy_(w.repeat(1, in_channels, 1, 1) * (3 / in_channels))
                        if child.bias is not None:
                            new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return new
    raise ValueError("the model has no Conv2d to adapt to in_channels")
