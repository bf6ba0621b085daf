"""Inception-v3 pool3 features for FID, in the layout of the FID reference network.

The FID literature uses the TensorFlow Inception graph of 2015-12-05. Its PyTorch port,
``pt_inception-2015-12-05-6726825d.pth`` published with the pytorch-fid project, is an
Inception v3 with 1008 classes and four altered blocks: in the A, C and first E blocks
the pool branch averages without counting padding, and in the last E block that branch
max-pools. This module builds that network (no torchvision needed) with the same module
names, so the file loads strictly; pool3 is the 2048-d global average before ``fc``.

Real weights: download that ``.pth`` file from the pytorch-fid GitHub release and pass
its path; it is read with ``torch.load(weights_only=True)``. ``width`` scales every
channel count and ``input_size`` the resize target, for tiny random test networks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_CLASSES = 1008
POOL3_DIM = 2048


@dataclass(frozen=True)
class InceptionConfig:
    """width: channel multiplier (1.0 = the real network); input_size: resize target."""

    width: float = 1.0
    input_size: int = 299

    def ch(self, channels: int) -> int:
        return max(1, round(channels * self.width))


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; names ``conv`` and ``bn`` as in the file."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_uncounted(x: torch.Tensor) -> torch.Tensor:
    # The TF graph's 3x3 average ignores padded zeros, unlike torch's default.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, c: InceptionConfig, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, c.ch(64), 1)
        self.branch5x5_1 = ConvBN(cin, c.ch(48), 1)
        self.branch5x5_2 = ConvBN(c.ch(48), c.ch(64), 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, c.ch(64), 1)
        self.branch3x3dbl_2 = ConvBN(c.ch(64), c.ch(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(c.ch(96), c.ch(96), 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_uncounted(x)),
        ], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c: InceptionConfig, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, c.ch(384), 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, c.ch(64), 1)
        self.branch3x3dbl_2 = ConvBN(c.ch(64), c.ch(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(c.ch(96), c.ch(96), 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, c: InceptionConfig, cin: int, mid: int):
        super().__init__()
        out = c.ch(192)
        self.branch1x1 = ConvBN(cin, out, 1)
        self.branch7x7_1 = ConvBN(cin, mid, 1)
        self.branch7x7_2 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(mid, out, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(mid, out, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, out, 1)

    def forward(self, x):
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg_pool_uncounted(x)),
        ], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction."""

    def __init__(self, c: InceptionConfig, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, c.ch(192), 1)
        self.branch3x3_2 = ConvBN(c.ch(192), c.ch(320), 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, c.ch(192), 1)
        self.branch7x7x3_2 = ConvBN(c.ch(192), c.ch(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(c.ch(192), c.ch(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(c.ch(192), c.ch(192), 3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven,
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; ``max_pool`` marks the network's last block."""

    def __init__(self, c: InceptionConfig, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, c.ch(320), 1)
        self.branch3x3_1 = ConvBN(cin, c.ch(384), 1)
        self.branch3x3_2a = ConvBN(c.ch(384), c.ch(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(c.ch(384), c.ch(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, c.ch(448), 1)
        self.branch3x3dbl_2 = ConvBN(c.ch(448), c.ch(384), 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(c.ch(384), c.ch(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(c.ch(384), c.ch(384), (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, c.ch(192), 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = (F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool
                  else _avg_pool_uncounted(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], 1)


def _block_e_width(c: InceptionConfig) -> int:
    return c.ch(320) + 4 * c.ch(384) + c.ch(192)


class FIDInception(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048 * width)."""

    def __init__(self, config: InceptionConfig | None = None):
        super().__init__()
        c = self.config = config or InceptionConfig()
        self.Conv2d_1a_3x3 = ConvBN(3, c.ch(32), 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(c.ch(32), c.ch(32), 3)
        self.Conv2d_2b_3x3 = ConvBN(c.ch(32), c.ch(64), 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(c.ch(64), c.ch(80), 1)
        self.Conv2d_4a_3x3 = ConvBN(c.ch(80), c.ch(192), 3)
        a_out = c.ch(64) + c.ch(64) + c.ch(96)  # BlockA without its pool branch
        self.Mixed_5b = BlockA(c, c.ch(192), c.ch(32))
        self.Mixed_5c = BlockA(c, a_out + c.ch(32), c.ch(64))
        self.Mixed_5d = BlockA(c, a_out + c.ch(64), c.ch(64))
        self.Mixed_6a = BlockB(c, a_out + c.ch(64))
        b_out = c.ch(384) + c.ch(96) + a_out + c.ch(64)
        self.Mixed_6b = BlockC(c, b_out, c.ch(128))
        self.Mixed_6c = BlockC(c, 4 * c.ch(192), c.ch(160))
        self.Mixed_6d = BlockC(c, 4 * c.ch(192), c.ch(160))
        self.Mixed_6e = BlockC(c, 4 * c.ch(192), c.ch(192))
        self.Mixed_7a = BlockD(c, 4 * c.ch(192))
        d_out = c.ch(320) + c.ch(192) + 4 * c.ch(192)
        self.Mixed_7b = BlockE(c, d_out, max_pool=False)
        self.Mixed_7c = BlockE(c, _block_e_width(c), max_pool=True)
        self.fc = nn.Linear(_block_e_width(c), FID_CLASSES)  # in the file; unused for pool3

    @property
    def feature_dim(self) -> int:
        return _block_e_width(self.config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # the TF graph expects [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def load_fid_inception(weights: str, device: str | torch.device = "cpu") -> FIDInception:
    """The real network from the pytorch-fid weights file, loaded strictly."""
    from bf_core.checkpoints import expected_shapes, load_state_dict_file, load_strict

    with torch.device("meta"):
        model = FIDInception()
    state = dict(load_state_dict_file(weights))
    # Files saved before torch 0.4.1 lack BatchNorm's step counters; eval never reads them.
    for key in expected_shapes(model):
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.tensor(0, dtype=torch.long))
    load_strict(model, state, f"FID Inception weights {weights}")
    return model.to(device).eval()
