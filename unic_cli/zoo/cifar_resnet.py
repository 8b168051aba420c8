"""The CIFAR-10 ResNet of He et al. (arXiv:1512.03385, Section 4.2) as a `py:` teacher.

Shape legend: B batch, C channels, H/W pixels, D token width (64), h/w feature grid (8x8 at 32 px).

This is the worked example of a user's own teacher: about forty lines of architecture, a `unic_card` dict, and
a forward that returns `{"summary": [B, 64], "patch": [B, 64, h, w]}` (see `unic_cli.teachers.py_module`).
Parameter names follow akamaster/pytorch_resnet_cifar10 (`conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2},
linear`), so its released checkpoints load strictly through the generic local-weights path::

    unic teachers check 'cifar_resnet56=../shared/data/cifar_resnet/resnet56-4bfd9763.th'

`pretrained=True` does not download anything: the weights always come from a local file given with the spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Card fields the `py:` adapter reads; the 8x8 last stage sits at stride 4 of a 32 px input.
CARD = {
    "family": "convnet",
    "image_size": 32,
    "patch_size": 4,
    "summary_dim": 64,
    "patch_dim": 64,
    "tokens": ["summary", "patch"],
    "summary_from": "pool",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "license": "BSD-2-Clause",
    "paper": "arXiv:1512.03385",
}


class BasicBlock(nn.Module):
    """Two 3x3 convs; "option A" shortcut: subsample and zero-pad channels, so it has no parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if stride != 1 or in_planes != planes else 0

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x_BCHW)))
        out = self.bn2(self.conv2(out))
        shortcut = x_BCHW
        if self.pad:
            shortcut = F.pad(x_BCHW[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32 px images: 16/32/64 channels in three stages of n blocks, strides 1/2/2."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.unic_card = dict(CARD)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        # Kept so the released checkpoints load strictly and `classify` can check them; unic never trains it.
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        # channels-last runs these small 16-64 channel convs about 1.5-3x faster on CPU (oneDNN); loading a
        # state dict copies into the parameters and keeps their layout.
        self.to(memory_format=torch.channels_last)

    def forward_features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the last stage's feature map [B, 64, H/4, W/4]."""
        x = F.relu(self.bn1(self.conv1(x_BCHW.contiguous(memory_format=torch.channels_last))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap_BDhw = self.forward_features(x_BCHW)
        return {"summary": fmap_BDhw.mean(dim=(2, 3)), "patch": fmap_BDhw}

    def classify(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """CIFAR-10 logits [B, 10], the network's original head."""
        return self.linear(self.forward_features(x_BCHW).mean(dim=(2, 3)))


def resnet20(pretrained: bool = False) -> CifarResNet:
    """ResNet-20 (0.27 M parameters). `pretrained` is accepted for the `py:` contract; weights come from a file."""
    return CifarResNet(20)


def resnet56(pretrained: bool = False) -> CifarResNet:
    """ResNet-56 (0.85 M parameters). `pretrained` is accepted for the `py:` contract; weights come from a file."""
    return CifarResNet(56)
