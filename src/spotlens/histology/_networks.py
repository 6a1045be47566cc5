"""The encoder networks (the math): EfficientNet-Lite0 and ResNet-50 trunks as ``nn.Module``.

Each takes a float batch ``n_tiles × 3 × H × W`` normalised with the ImageNet mean and standard
deviation and returns ``n_tiles × n_features``. :mod:`spotlens.histology._encoders` wraps them
as :class:`~spotlens.histology._encoders.Encoder` objects.
"""

from __future__ import annotations


from .._backend import import_torch

torch = import_torch()
nn = torch.nn
F = torch.nn.functional


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 trunk with global average pooling: ``n × 3 × 224 × 224 -> n × 1280``.

    Wraps ``efficientnet_lite_pytorch.EfficientNet``; ``extract_features`` gives the
    ``n × 1280 × 7 × 7`` map of the head convolution (after BN and ReLU6), averaged here over
    the spatial axes. The ImageNet classifier (``_fc``) is kept (so the checkpoint loads
    strictly) but not used.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        """Return ``n × 1280`` pooled features of a normalised ``n × 3 × 224 × 224`` batch."""
        return self.net.extract_features(x).mean(dim=(2, 3))


class EfficientNetLite0PreHead(nn.Module):
    """EfficientNet-Lite0 up to its last block: ``n × 3 × 224 × 224 -> n × (320 · cells)``.

    The stem and the 16 MBConv blocks, whose ``n × 320 × 7 × 7`` map is average-pooled
    ``pool × pool`` (ceil mode: 7 × 7 -> 4 × 4 = 16 cells for ``pool=2``) and flattened
    channel-major (``channel · cells + cell``). What the head convolution (1 × 1, 320 -> 1280,
    BN, ReLU6) reads; :class:`~spotlens.histology._models.TileHead` is a trainable copy of it.
    """

    def __init__(self, net: nn.Module, pool: int = 2):
        super().__init__()
        self.net = net
        self.pool = int(pool)

    def forward(self, x):
        """Return ``n × (320 · cells)`` pooled maps of a normalised ``n × 3 × 224 × 224`` batch."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x, drop_connect_rate=None)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool, ceil_mode=True)
        return x.flatten(1)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1×1, 3×3 with the stride, 1×1 ×4), torchvision naming."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        """Apply the block: ``relu(bn3(conv3(...)) + shortcut(x))``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Features(nn.Module):
    """ResNet-50 returning ``n × 2048`` average-pooled features of an ``n × 3 × H × W`` batch.

    Bottleneck blocks ``[3, 4, 6, 3]`` with the stride on the 3×3 convolution ("ResNet v1.5",
    as in torchvision). Parameter and buffer names equal torchvision's ``resnet50``
    (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layer1.0.downsample.0``, ``fc``), so its
    checkpoints load with ``strict=True``. ``fc`` (2048 -> ``num_classes``) exists only for
    that; :meth:`forward` stops at the pooled features.

    Source: He K., Zhang X., Ren S., Sun J., "Deep residual learning for image recognition",
    CVPR 2016, https://arxiv.org/abs/1512.03385.
    """

    dim = 2048

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (width, blocks, stride) in enumerate(
            [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
        ):
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(in_channels, width, stride if block == 0 else 1))
                in_channels = width * Bottleneck.expansion
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        """Return ``n × 2048`` pooled features of a normalised ``n × 3 × H × W`` batch."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)
