"""CIFAR-100 students and teachers in the style of the knowledge-distillation model zoos (the CRD / DKD
benchmarks): 32×32 inputs, ``forward(self, x, is_feat=False, preact=False)``, and with ``is_feat`` the
intermediate features next to the logits.

Written for gpdc's tests as users ship them (``gpdc compile tests/user_models/kd_cifar.py --entry resnet8x4``):
every builder takes no arguments and returns a randomly initialised model.

Output conventions:

* the flag-style models return ``logits`` by default and ``(logits, {"feats": [f0, ..., fk], "pooled": p})``
  when called with ``is_feat=True`` (``preact=True``: the stage features before their last ReLU);
* ``resnet8x4`` always returns the feature structure (models that always hand features to the KD loss);
* ``resnet8x4_feats``, ``resnet8x4_namedtuple`` and ``resnet8x4_dataclass`` wrap a flag-style ResNet-8x4 with
  ``forward(self, x)`` and return a tuple, a namedtuple and a (pytree-registered) dataclass.
"""

from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

NUM_CLASSES = 100


def _features(logits, feats, pooled):
    return logits, {"feats": feats, "pooled": pooled}


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------- ResNet (CIFAR)

def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        preact = out
        out = F.relu(out)
        if self.is_last:
            return out, preact
        return out


class ResNet(nn.Module):
    """CIFAR ResNet: a 3×3 stem, ``(depth - 2) // 6`` basic blocks per stage, 3 or 4 stages
    (``len(num_filters) - 1``), global average pooling and a linear classifier."""

    def __init__(self, depth, num_filters, num_classes=NUM_CLASSES, always_feat=False):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth should be 6n+2 (e.g. 8, 20, 32, 56, 110)"
        n = (depth - 2) // 6
        self.always_feat = always_feat
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.stages = 3
        if len(num_filters) > 4:
            self.layer4 = self._make_layer(num_filters[4], n, stride=2)
            self.stages = 4
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(num_filters[-1], num_classes)
        _init(self)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, is_last=(blocks == 1))]
        self.inplanes = planes
        for i in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, is_last=(i == blocks - 1)))
        return nn.Sequential(*layers)

    def get_feat_modules(self):
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def forward(self, x, is_feat=False, preact=False):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, f1_pre = self.layer1(x)
        f1 = x
        x, f2_pre = self.layer2(x)
        f2 = x
        x, f3_pre = self.layer3(x)
        f3 = x
        feats, pre = [f0, f1, f2, f3], [f0, f1_pre, f2_pre, f3_pre]
        if self.stages == 4:
            x, f4_pre = self.layer4(x)
            feats.append(x)
            pre.append(f4_pre)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        pooled = x
        x = self.fc(x)
        if self.always_feat or is_feat:
            return _features(x, pre if preact else feats, pooled)
        return x


def resnet8x4():
    """ResNet-8x4 (1 block per stage, widths 32/64/128/256) that always returns
    ``(logits, {"feats": [f0, f1, f2, f3], "pooled": pooled})``."""
    return ResNet(8, [32, 64, 128, 256], always_feat=True)


def resnet32x4():
    """ResNet-32x4 (5 blocks per stage, widths 32/64/128/256): the usual CIFAR-100 teacher."""
    return ResNet(32, [32, 64, 128, 256])


def resnet56():
    """ResNet-56 (9 blocks per stage, widths 16/16/32/64)."""
    return ResNet(56, [16, 16, 32, 64])


def resnet20_4stage():
    """ResNet-20 with four stages (3 blocks each, widths 16/16/32/64/128): a 4×4 last stage at 32×32."""
    return ResNet(20, [16, 16, 32, 64, 128])


# ---------------------------------------------------------------------- ResNet-8x4 with other output styles

KDOutput = namedtuple("KDOutput", ["logits", "feats", "pooled"])


@dataclass
class FeatureOutput:
    logits: torch.Tensor
    feats: list
    pooled: torch.Tensor


pytree.register_dataclass(FeatureOutput)


class WithFeatures(nn.Module):
    """Wraps a flag-style model: ``forward(x)`` always asks it for features (``is_feat=True``)."""

    def __init__(self, net, preact=False):
        super().__init__()
        self.net = net
        self.preact = preact

    def forward(self, x):
        return self.net(x, is_feat=True, preact=self.preact)


class NamedTupleFeatures(WithFeatures):
    def forward(self, x):
        logits, out = self.net(x, is_feat=True, preact=self.preact)
        return KDOutput(logits, out["feats"], out["pooled"])


class DataclassFeatures(WithFeatures):
    def forward(self, x):
        logits, out = self.net(x, is_feat=True, preact=self.preact)
        return FeatureOutput(logits=logits, feats=out["feats"], pooled=out["pooled"])


def resnet8x4_feats():
    """ResNet-8x4 behind ``forward(x)``: ``(logits, {"feats": [f0..f3], "pooled": p})`` (no flags to trace)."""
    return WithFeatures(ResNet(8, [32, 64, 128, 256]))


def resnet8x4_namedtuple():
    """ResNet-8x4 returning ``KDOutput(logits, feats=[f0..f3], pooled)`` (a namedtuple), pre-activation feats."""
    return NamedTupleFeatures(ResNet(8, [32, 64, 128, 256]), preact=True)


def resnet8x4_dataclass():
    """ResNet-8x4 returning a ``FeatureOutput`` dataclass (registered with torch's pytree)."""
    return DataclassFeatures(ResNet(8, [32, 64, 128, 256]))


# ------------------------------------------------------------------------------- Wide ResNet (pre-activation)

class WideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = None
        if not self.equal_in_out:
            self.conv_shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x):
        if not self.equal_in_out:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equal_in_out else self.conv_shortcut(x), out)


class WideStage(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen_factor=1, num_classes=NUM_CLASSES, drop_rate=0.0):
        super().__init__()
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        assert (depth - 4) % 6 == 0, "depth should be 6n+4"
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideStage(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideStage(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.n_channels = widths[3]
        _init(self)

    def forward(self, x, is_feat=False, preact=False):
        out = self.conv1(x)
        f0 = out
        out = self.block1(out)
        f1 = out
        out = self.block2(out)
        f2 = out
        out = self.block3(out)
        f3 = out
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.view(-1, self.n_channels)
        pooled = out
        out = self.fc(out)
        if is_feat:
            if preact:  # the next pre-activation BN applied to each stage's output
                f1 = self.block2.layer[0].bn1(f1)
                f2 = self.block3.layer[0].bn1(f2)
                f3 = self.bn1(f3)
            return _features(out, [f0, f1, f2, f3], pooled)
        return out


def wrn_16_2():
    """WRN-16-2 (pre-activation, 2 blocks per stage, widths 32/64/128)."""
    return WideResNet(16, 2)


def wrn_40_2():
    """WRN-40-2 (pre-activation, 6 blocks per stage, widths 32/64/128)."""
    return WideResNet(40, 2)


# ---------------------------------------------------------------------------------------------- MobileNetV2

def conv_bn(inp, oup, stride):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp, oup):
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def make_divisible(v, divisor=8):
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        assert stride in (1, 2)
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # pointwise (also when expand_ratio == 1)
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pointwise-linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for CIFAR (stride-2 stem, stride 1 in the second setting) with a width multiplier."""

    def __init__(self, T, feature_dim=NUM_CLASSES, input_size=32, width_mult=1.0, remove_avg=False):
        super().__init__()
        self.remove_avg = remove_avg
        settings = [  # t, c, n, s
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = make_divisible(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.avgpool = nn.AvgPool2d(input_size // (32 // 2), ceil_mode=True)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        _init(self)

    def forward(self, x, is_feat=False, preact=False):
        out = self.conv1(x)
        f0 = out
        out = self.blocks[0](out)
        out = self.blocks[1](out)
        f1 = out
        out = self.blocks[2](out)
        f2 = out
        out = self.blocks[3](out)
        out = self.blocks[4](out)
        f3 = out
        out = self.blocks[5](out)
        out = self.blocks[6](out)
        f4 = out
        out = self.conv2(out)
        if not self.remove_avg:
            out = self.avgpool(out)
        out = out.view(out.size(0), -1)
        pooled = out
        out = self.classifier(out)
        if is_feat:
            return _features(out, [f0, f1, f2, f3, f4], pooled)
        return out


def mobilenetv2():
    """MobileNetV2 ×0.5 with expansion 6 (the zoo's ``mobile_half``)."""
    return MobileNetV2(T=6, width_mult=0.5)


# --------------------------------------------------------------------------------------------- ShuffleNet V1

class ChannelShuffle(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        """[N, C, H, W] -> [N, g, C/g, H, W] -> [N, C/g, g, H, W] -> [N, C, H, W]"""
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleUnitV1(nn.Module):
    def __init__(self, in_planes, out_planes, stride, groups, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.stride = stride
        mid_planes = out_planes // 4
        g = 1 if in_planes == 24 else groups  # the first unit reads the 24-channel stem: no grouping
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        out = F.relu(preact)
        if self.is_last:
            return out, preact
        return out


class ShuffleNetV1(nn.Module):
    def __init__(self, out_planes, num_blocks, groups, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        _init(self)

    def _make_layer(self, out_planes, num_blocks, groups):
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # stride-2 units concatenate the pooled input
            layers.append(ShuffleUnitV1(self.in_planes, out_planes - cat_planes, stride, groups,
                                        is_last=(i == num_blocks - 1)))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x, is_feat=False, preact=False):
        out = F.relu(self.bn1(self.conv1(x)))
        f0 = out
        out, f1_pre = self.layer1(out)
        f1 = out
        out, f2_pre = self.layer2(out)
        f2 = out
        out, f3_pre = self.layer3(out)
        f3 = out
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        pooled = out
        out = self.linear(out)
        if is_feat:
            feats = [f0, f1_pre, f2_pre, f3_pre] if preact else [f0, f1, f2, f3]
            return _features(out, feats, pooled)
        return out


def shufflenetv1():
    """ShuffleNet V1, g = 3 (widths 240/480/960, 4/8/4 units)."""
    return ShuffleNetV1(out_planes=[240, 480, 960], num_blocks=[4, 8, 4], groups=3)


# --------------------------------------------------------------------------------------------- ShuffleNet V2

class SplitBlock(nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)
        return x[:, :c, :, :], x[:, c:, :, :]


class ShuffleUnitV2(nn.Module):
    def __init__(self, in_channels, split_ratio=0.5, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.split = SplitBlock(split_ratio)
        in_channels = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, groups=in_channels, bias=False)
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.conv3 = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(in_channels)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        preact = self.bn3(self.conv3(out))
        out = F.relu(preact)
        preact = torch.cat([x1, preact], 1)
        out = torch.cat([x1, out], 1)
        out = self.shuffle(out)
        if self.is_last:
            return out, preact
        return out


class DownUnitV2(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        # left: depthwise stride 2, then pointwise
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: pointwise, depthwise stride 2, pointwise
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    CONFIGS = {
        0.5: ((48, 96, 192, 1024), (3, 7, 3)),
        1: ((116, 232, 464, 1024), (3, 7, 3)),
        1.5: ((176, 352, 704, 1024), (3, 7, 3)),
        2: ((224, 488, 976, 2048), (3, 7, 3)),
    }

    def __init__(self, net_size=1, num_classes=NUM_CLASSES):
        super().__init__()
        out_channels, num_blocks = self.CONFIGS[net_size]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        _init(self)

    def _make_layer(self, out_channels, num_blocks):
        layers = [DownUnitV2(self.in_channels, out_channels)]
        for i in range(num_blocks):
            layers.append(ShuffleUnitV2(out_channels, is_last=(i == num_blocks - 1)))
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x, is_feat=False, preact=False):
        out = F.relu(self.bn1(self.conv1(x)))
        f0 = out
        out, f1_pre = self.layer1(out)
        f1 = out
        out, f2_pre = self.layer2(out)
        f2 = out
        out, f3_pre = self.layer3(out)
        f3 = out
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        pooled = out
        out = self.linear(out)
        if is_feat:
            feats = [f0, f1_pre, f2_pre, f3_pre] if preact else [f0, f1, f2, f3]
            return _features(out, feats, pooled)
        return out


def shufflenetv2():
    """ShuffleNet V2 1× (widths 116/232/464, 1024-channel head); the split is ``int(x.size(1) * ratio)``."""
    return ShuffleNetV2(net_size=1)


# --------------------------------------------------------------------------------------------------------- VGG

class VGG(nn.Module):
    def __init__(self, cfg, batch_norm=False, num_classes=NUM_CLASSES):
        super().__init__()
        self.block0 = self._make_layers(cfg[0], batch_norm, 3)
        self.block1 = self._make_layers(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], batch_norm, cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        _init(self)

    @staticmethod
    def _make_layers(cfg, batch_norm=False, in_channels=3):
        layers = []
        for v in cfg:
            if v == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                conv = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
                layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]
                in_channels = v
        return nn.Sequential(*layers[:-1])  # the block's last ReLU runs in forward (pre-activation features)

    def forward(self, x, is_feat=False, preact=False):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        f0 = x
        x = self.pool0(x)
        x = self.block1(x)
        f1_pre = x
        x = F.relu(x)
        f1 = x
        x = self.pool1(x)
        x = self.block2(x)
        f2_pre = x
        x = F.relu(x)
        f2 = x
        x = self.pool2(x)
        x = self.block3(x)
        f3_pre = x
        x = F.relu(x)
        f3 = x
        if h == 64:  # 64×64 inputs (e.g. Tiny-ImageNet) pool once more
            x = self.pool3(x)
        x = self.block4(x)
        f4_pre = x
        x = F.relu(x)
        f4 = x
        x = self.pool4(x)
        x = x.view(x.size(0), -1)
        pooled = x
        x = self.classifier(x)
        if is_feat:
            feats = [f0, f1_pre, f2_pre, f3_pre, f4_pre] if preact else [f0, f1, f2, f3, f4]
            return _features(x, feats, pooled)
        return x


def vgg8():
    """VGG-8 with BatchNorm (one conv per block, widths 64/128/256/512/512)."""
    return VGG([[64], [128], [256], [512], [512]], batch_norm=True)
