"""EfficientAD networks (Batzner et al., WACV 2024): the patch description network (PDN) for
teacher and student, the autoencoder, the deployed scoring graph, and the distillation target.

Channels, kernels, strides and pools follow the paper's Tables 6-8. Convolutions and pools are
unpadded, as in the authors' reference code (the paper's table pads): every output pixel then
sees a real 33x33 input patch, never zeros. Padded outputs at the border are unlike any others,
and a briefly trained student leaves them as the largest errors of every image, which buries the
defects. A 256x256 image gives 56x56 outputs; output i covers input pixels 4i..4i+32, so the maps
are padded by 4 cells to the 64x64 stride-4 grid of the image.
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from models.backbone import ResNetFeatures
from utils import UserError

IMAGE_SIZE = 256
OUT_CHANNELS = 384
MODEL_SIZES = ("small", "medium")
RECEPTIVE_FIELD = 33
MAP_BORDER = 4   # output cells between the image edge and the first valid output (16 px / stride 4)
MAP_SIZE = IMAGE_SIZE // 4 - 2 * MAP_BORDER


def conv(cin, cout, kernel, stride=1, padding=0):
    """Conv2D with PyTorch's default initialisation, U(+-1/sqrt(fan_in)) for weights and biases,
    which the paper's networks were trained from. Paddle's default (He normal, 2.4x the spread)
    makes an untrained 4-layer student output ~30x larger, and at lr 1e-4 the first hundreds of
    steps would go to shrinking it instead of imitating the teacher."""
    bound = 1.0 / math.sqrt(cin * kernel * kernel)
    init = nn.initializer.Uniform(-bound, bound)
    return nn.Conv2D(cin, cout, kernel, stride=stride, padding=padding,
                     weight_attr=paddle.ParamAttr(initializer=init), bias_attr=paddle.ParamAttr(initializer=init))


def _pool():
    return nn.AvgPool2D(2, 2)


def pdn(model_size, out_channels=OUT_CHANNELS):
    """PDN-S: convs of 128, 256, 256, out channels with kernels 4, 4, 3, 4 and average pools
    after the first two; PDN-M: 256, 512, 512 (1x1), 512, out, out (1x1)."""
    if model_size == "small":
        layers = [conv(3, 128, 4), nn.ReLU(), _pool(),
                  conv(128, 256, 4), nn.ReLU(), _pool(),
                  conv(256, 256, 3), nn.ReLU(),
                  conv(256, out_channels, 4)]
    elif model_size == "medium":
        layers = [conv(3, 256, 4), nn.ReLU(), _pool(),
                  conv(256, 512, 4), nn.ReLU(), _pool(),
                  conv(512, 512, 1), nn.ReLU(),
                  conv(512, 512, 3), nn.ReLU(),
                  conv(512, out_channels, 4), nn.ReLU(),
                  conv(out_channels, out_channels, 1)]
    else:
        raise UserError(f"unknown --model_size {model_size}; choose one of {', '.join(MODEL_SIZES)}")
    return nn.Sequential(*layers)


class AutoEncoder(nn.Layer):
    """Paper Table 8: six strided 4x4 convs down to a 64-d code, then bilinear upsampling to
    3, 8, 15, 32, 63, 127 px with a 4x4 conv (+dropout 0.2) after each, resize to the PDN's
    56 px output and two 3x3 convs to the teacher's 384 channels."""

    UPSAMPLE_SIZES = (3, 8, 15, 32, 63, 127)

    def __init__(self, out_channels=OUT_CHANNELS):
        super().__init__()
        chans = (3, 32, 32, 64, 64, 64)
        enc = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            enc += [conv(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(*enc, conv(64, 64, 8))
        self.up_convs = nn.LayerList([conv(64, 64, 4, padding=2) for _ in self.UPSAMPLE_SIZES])
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Sequential(conv(64, 64, 3, padding=1), nn.ReLU(), conv(64, out_channels, 3, padding=1))

    def forward(self, x):
        x = self.encoder(x)
        for size, conv in zip(self.UPSAMPLE_SIZES, self.up_convs):
            x = self.dropout(F.relu(conv(F.interpolate(x, size=[size, size], mode="bilinear"))))
        return self.head(F.interpolate(x, size=[MAP_SIZE, MAP_SIZE], mode="bilinear"))


class NormalizedTeacher(nn.Layer):
    """Teacher PDN whose outputs are standardised per channel with the training-set statistics."""

    def __init__(self, model_size):
        super().__init__()
        self.pdn = pdn(model_size)
        self.register_buffer("mean", paddle.zeros([1, OUT_CHANNELS, 1, 1]))
        self.register_buffer("std", paddle.ones([1, OUT_CHANNELS, 1, 1]))

    def forward(self, x):
        return (self.pdn(x) - self.mean) / self.std


class EfficientADNet(nn.Layer):
    """image [B,3,256,256] -> (local map, global map), each [B,56,56]: the exported graph.
    local = mean over channels of (teacher - student[:384])^2, global = (AE - student[384:])^2."""

    def __init__(self, model_size):
        super().__init__()
        self.teacher = NormalizedTeacher(model_size)
        self.student = pdn(model_size, 2 * OUT_CHANNELS)
        self.autoencoder = AutoEncoder()

    def forward(self, x):
        s = self.student(x)
        local = ((self.teacher(x) - s[:, :OUT_CHANNELS]) ** 2).mean(axis=1)
        glob = ((self.autoencoder(x) - s[:, OUT_CHANNELS:]) ** 2).mean(axis=1)
        return local, glob


class DistillationTarget(nn.Layer):
    """What the teacher learns to reproduce: a pretrained ResNet's layer2 + layer3 features
    (PatchCore-style 3x3 local averaging, layer3 upsampled to layer2) on the image at twice the
    PDN's resolution, so they land on the PDN's output grid (stride 4; the border cells that
    no valid PDN output covers are cut off). Channels beyond 384
    (wider backbones) are averaged in equal groups, as the paper reduces WRN-101's."""

    def __init__(self, arch):
        super().__init__()
        self.backbone = ResNetFeatures(arch, ("layer2", "layer3"))
        channels = sum(self.backbone.channels())
        if channels % OUT_CHANNELS:
            raise UserError(f"--arch {arch} gives {channels} layer2+layer3 channels, not a multiple of "
                            f"{OUT_CHANNELS}; use resnet18 or a wide ResNet")
        self.group = channels // OUT_CHANNELS

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="bilinear")
        l2, l3 = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in self.backbone(x)]
        f = paddle.concat([l2, F.interpolate(l3, size=l2.shape[-2:], mode="bilinear")], axis=1)
        if self.group > 1:
            b, c, h, w = f.shape
            f = f.reshape([b, OUT_CHANNELS, self.group, h, w]).mean(axis=2)
        return f[:, :, MAP_BORDER:-MAP_BORDER, MAP_BORDER:-MAP_BORDER]
