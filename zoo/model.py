"""ISANet as MMSegmentation builds it: ResNetV1c-D8 + ISA decode head + FCN auxiliary head.

Module names and registration order are MMSegmentation's (spec §1-2), so `state_dict()` has exactly
the keys, shapes and order of a published checkpoint and weights map by name. SyncBN is plain
BatchNorm2d here; training converts it with `nn.SyncBatchNorm.convert_sync_batchnorm` under DDP.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from isa_triton import sparse_attention

from .inference import TestSettings
from .metadata import ModelMeta
from .registry import VariantConfig

MIN_INPUT_SIZE = 32
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class ConvModule(nn.Module):
    """mmcv's ConvModule as ISANet uses it: bias-free conv -> BN (named `bn`) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """ResNet bottleneck, pytorch style: the stride sits on the 3x3 conv2."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNetV1c(nn.Module):
    """ResNetV1c-D8: deep stem, strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation."""

    def __init__(self, depth: int = 50):
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (blocks, stride, dilation) in enumerate(zip(RESNET_BLOCKS[depth], (1, 2, 1, 1), (1, 1, 2, 4))):
            planes = 64 * 2 ** i
            self.add_module(f"layer{i + 1}", self._make_layer(inplanes, planes, blocks, stride, dilation))
            inplanes = planes * Bottleneck.expansion
        self.init_weights()

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        width = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != width:
            downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(width))
        # contract_dilation: the first block of a dilated stage uses half the dilation
        first_dilation = dilation // 2 if dilation > 1 else dilation
        layers = [Bottleneck(inplanes, planes, stride, first_dilation, downsample)]
        layers += [Bottleneck(width, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        """MMSeg's ResNet init: Kaiming convs, BN 1/0, zero-init of each block's last BN."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return tuple(outs)


class SelfAttentionBlock(nn.Module):
    """ISA's attention block: 2-conv key/query projections, biased 1x1 value conv, output ConvModule."""

    def __init__(self, in_channels: int = 512, channels: int = 256, backend: str = "auto"):
        super().__init__()
        self.channels = channels
        self.backend = backend
        self.key_project = nn.Sequential(ConvModule(in_channels, channels, 1), ConvModule(channels, channels, 1))
        self.query_project = nn.Sequential(ConvModule(in_channels, channels, 1), ConvModule(channels, channels, 1))
        self.value_project = nn.Conv2d(in_channels, in_channels, 1)
        self.output_project = ConvModule(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor, pattern: str, block_size: Tuple[int, int]) -> torch.Tensor:
        # The projections are pointwise, so running them on the whole (padded) map equals MMSeg's
        # per-group calls, BN statistics included (same pixels), with no permute copies.
        query = self.query_project(x)
        key = self.key_project(x)
        value = self.value_project(x)
        context = sparse_attention(query, key, value, pattern, block_size,
                                   scale=self.channels ** -0.5, backend=self.backend)
        return self.output_project(context)


def _init_head_convs(module: nn.Module) -> None:
    """ConvModule convs Kaiming (fan_out, relu), BN 1/0; `value_project` keeps PyTorch's default."""
    for m in module.modules():
        if isinstance(m, ConvModule):
            nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.ones_(m.bn.weight)
            nn.init.zeros_(m.bn.bias)


def init_classifier(conv_seg: nn.Conv2d) -> None:
    """MMSeg's `conv_seg` init: Normal(0, 0.01), bias 0."""
    nn.init.normal_(conv_seg.weight, std=0.01)
    nn.init.zeros_(conv_seg.bias)


class ISAHead(nn.Module):
    """Interlaced sparse self-attention decode head (spec §1.3)."""

    def __init__(self, num_classes: int, in_channels: int = 2048, channels: int = 512,
                 isa_channels: int = 256, down_factor: Sequence[int] = (8, 8), dropout_ratio: float = 0.1,
                 align_corners: bool = False, backend: str = "auto"):
        super().__init__()
        self.align_corners = align_corners
        self.down_factor = (int(down_factor[0]), int(down_factor[1]))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.in_conv = ConvModule(in_channels, channels, 3, padding=1)
        self.global_relation = SelfAttentionBlock(channels, isa_channels, backend)
        self.local_relation = SelfAttentionBlock(channels, isa_channels, backend)
        self.out_conv = ConvModule(channels * 2, channels, 1)
        _init_head_convs(self)
        init_classifier(self.conv_seg)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.in_conv(feats[3])
        residual = x
        _, _, h, w = x.shape
        bh, bw = self.down_factor
        pad_h, pad_w = math.ceil(h / bh) * bh - h, math.ceil(w / bw) * bw - w
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            # zeros before the projections, the odd pixel bottom/right, no mask (checkpoint-faithful)
            x = F.pad(x, (left, pad_w - left, top, pad_h - top))
        if x.is_cuda:
            # channels_last makes q/k/v token rows contiguous channel vectors: the Triton long-range
            # kernels then read 16-byte segments instead of 2-byte gathers (one cheap copy here)
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.global_relation(x, "long", self.down_factor)
        x = self.local_relation(x, "short", self.down_factor)
        if pad_h or pad_w:
            x = x[:, :, top:top + h, left:left + w]
        x = self.out_conv(torch.cat([x, residual], dim=1))  # attention output first, residual second
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """The auxiliary head on layer3: one 3x3 ConvModule, dropout, classifier (training only)."""

    def __init__(self, num_classes: int, in_channels: int = 1024, channels: int = 256,
                 dropout_ratio: float = 0.1, align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))
        _init_head_convs(self)
        init_classifier(self.conv_seg)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(feats[2])))


def check_image_batch(x: torch.Tensor) -> None:
    """Raise a ValueError naming the fix when `x` is not a normalized (N, 3, H>=32, W>=32) float batch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor batch (N, 3, H, W), got {type(x).__name__}")
    if x.dim() == 3:
        raise ValueError(f"expected a batch (N, 3, H, W), got shape {tuple(x.shape)}: add a batch "
                         "dimension with x.unsqueeze(0)")
    if x.dim() != 4 or x.shape[1] != 3:
        hint = {1: "convert grey images to RGB (repeat the channel 3 times)",
                4: "drop the alpha channel (x[:, :3])"}.get(x.shape[1] if x.dim() == 4 else -1,
                                                             "pass RGB images as (N, 3, H, W)")
        raise ValueError(f"expected a (N, 3, H, W) RGB batch, got shape {tuple(x.shape)}: {hint}")
    if not x.is_floating_point():
        raise ValueError(f"expected a normalized float batch, got dtype {x.dtype}: convert with "
                         "x.float() and normalize with the variant's img_norm mean/std")
    h, w = x.shape[2:]
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
        raise ValueError(f"input {h}x{w} is too small: H and W must be at least {MIN_INPUT_SIZE} "
                         "(the 1/8 feature map needs 4 pixels a side); resize or pad the image")


class ISANet(nn.Module):
    """MMSegmentation's EncoderDecoder for ISANet: `backbone`, `decode_head`, `auxiliary_head`.

    Eval mode: `model(x)` maps a normalised batch to logits at the input size (MMSeg's `encode_decode`);
    photos in, label maps out (resize, normalise, slide, back to size) is `zoo.Segmenter`.
    Train mode: `model(x)` returns `(decode_logits, aux_logits)` at 1/8 resolution.
    `model.meta` says what the weights are (classes, palette, test pipeline; `zoo.metadata`).

    Example:
        >>> model = ISANet(get_config("isanet_r50-d8_512x1024_40k_cityscapes")).eval()
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 19, 64, 64])
    """

    def __init__(self, config: VariantConfig, num_classes: Optional[int] = None, backend: str = "auto",
                 meta: Optional[ModelMeta] = None):
        super().__init__()
        self.config = config
        self.num_classes = int(num_classes or config.num_classes)
        if meta is not None and meta.num_classes != self.num_classes:
            raise ValueError(f"meta describes {meta.num_classes} classes, the model has {self.num_classes}")
        self.meta = meta or ModelMeta.for_variant(config, self.num_classes)
        self.align_corners = bool(config.align_corners)
        dh, ah = config.decode_head, config.auxiliary_head
        self.backbone = ResNetV1c(config.depth)
        self.decode_head = ISAHead(self.num_classes, dh.in_channels, dh.channels, dh.isa_channels,
                                   dh.down_factor, dh.dropout_ratio, self.align_corners, backend)
        self.auxiliary_head = FCNHead(self.num_classes, ah.in_channels, ah.channels, ah.dropout_ratio,
                                      self.align_corners)

    @property
    def test_settings(self) -> TestSettings:
        """The test pipeline these weights were validated with (`meta.test`)."""
        return self.meta.test

    @property
    def backend(self) -> str:
        """The attention backend the ISA head asks `isa_triton.sparse_attention` for."""
        return self.decode_head.global_relation.backend

    def set_backend(self, backend: str) -> "ISANet":
        """Switch the attention backend ('auto', 'triton', 'eager', 'sdpa'); returns self."""
        for block in (self.decode_head.global_relation, self.decode_head.local_relation):
            block.backend = backend
        return self

    def encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input size, whole-image (MMSeg's `encode_decode`)."""
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)

    def forward(self, x: torch.Tensor):
        check_image_batch(x)
        if not self.training:
            return self.encode_decode(x)
        feats = self.backbone(x)
        return self.decode_head(feats), self.auxiliary_head(feats)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input size of a normalised batch with the test mode (whole, or slide per spec §3.2)."""
        from .inference import network_logits

        check_image_batch(x)
        return network_logits(self.encode_decode, x, self.test_settings)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Label map (N, H, W) int64 with the variant's test mode; switches to eval mode."""
        self.eval()
        return self.inference(x).argmax(dim=1)
