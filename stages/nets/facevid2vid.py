"""SadTalker's face renderer (face-vid2vid): the keypoint detector and the occlusion-aware SPADE generator.

Checkpoint-compatible with the official files: `state_dict()` keys and shapes are exactly those of the `kp_extractor.`
and `generator.` sections (prefix stripped), spectral-normalised convs included (`weight_orig/weight_u/weight_v`).

The generator is split for streaming: `encode_source` computes everything that depends on the portrait alone once
(`SourceEncoding`), `render` turns a batch of driving keypoints into frames, sharing one encoding across the batch
without copying it. `forward` is upstream's uncached call, kept for parity.

Precision: keypoint soft-argmax, the sparse/dense motion grids, both `grid_sample` warps, the Gaussian heatmaps and
the motion-mask softmax always run in float32 (coordinates need ~1e-4 of the [-1, 1] range, fp16 gives ~5e-4; the
1e-3 mask floor sits at fp16's resolution), whatever dtype the convolutions use. Keypoints come out as float32.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NUM_KP = 15
DEPTH = 16  # depth of every 3-D feature volume
KP_TEMPERATURE = 0.1  # keypoint soft-argmax sharpness
KP_VARIANCE = 0.01  # Gaussian heatmap variance in the [-1, 1] cube
MASK_FLOOR = 1e-3  # motion-mask weights below this are zeroed (and the rest not renormalised), as upstream
SPADE_HIDDEN = 128
DECODER_CHANNELS = 256  # the warped feature: the decoder's input and its SPADE segmentation map


def coordinate_grid(depth: int, height: int, width: int, *, device: torch.device | None = None) -> torch.Tensor:
    """(depth, height, width, 3) float32 (x, y, z) coordinates, corner-aligned: 2 i / (n - 1) - 1.

    grid_sample later reads them with align_corners=False; the half-pixel mismatch is upstream's and is kept."""
    def axis(n: int) -> torch.Tensor:
        return 2 * (torch.arange(n, dtype=torch.float32, device=device) / (n - 1)) - 1

    z, y, x = torch.meshgrid(axis(depth), axis(height), axis(width), indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def use_channels_last(module: nn.Module) -> nn.Module:
    """Move 4-D weights to channels_last and 5-D ones to channels_last_3d, in place (`Module.to(memory_format=)`
    refuses modules that mix Conv2d and Conv3d)."""
    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4:
            return tensor.contiguous(memory_format=torch.channels_last)
        if tensor.dim() == 5:
            return tensor.contiguous(memory_format=torch.channels_last_3d)
        return tensor

    return module._apply(convert)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2 over height and width, depth kept (every upsampling in face-vid2vid is nearest)."""
    return F.interpolate(x, scale_factor=(1, 2, 2) if x.dim() == 5 else (2, 2), mode="nearest")


def _warp_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the whole network runs in it."""
    return torch.promote_types(dtype, torch.float32)


def _sample(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear `grid_sample` (zeros padding, align_corners=False) of volume (N, C, D, H, W) at grid
    (B, D', H', W', 3) -> (B, C, D', H', W'), with N == B or N == 1.

    One shared volume (N == 1) is not repeated per frame: the frames' grids are stacked along depth instead, which
    samples exactly the same points."""
    frames = grid.shape[0]
    if volume.shape[0] == frames:
        return F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if volume.shape[0] != 1:
        raise ValueError(f"a source encoding of batch {volume.shape[0]} cannot drive {frames} frames")
    stacked = grid.reshape(1, frames * grid.shape[1], *grid.shape[2:])
    sampled = F.grid_sample(volume, stacked, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.unflatten(2, (frames, grid.shape[1]))[0].transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------- blocks


class SameBlock2d(nn.Module):
    """conv + BatchNorm + ReLU (LeakyReLU 0.01 where upstream asks for it), resolution kept."""

    def __init__(self, cin: int, cout: int, leaky: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout)
        self.leaky = leaky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        return F.leaky_relu(out, 0.01) if self.leaky else F.relu(out)


class DownBlock2d(SameBlock2d):
    """conv + BatchNorm + ReLU, then 2x2 average pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(super().forward(x), 2)


class DownBlock3d(nn.Module):
    """conv 3x3x3 + BatchNorm3d + ReLU, then average pooling over height and width only (depth stays 16)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), (1, 2, 2))


class UpBlock3d(DownBlock3d):
    """Nearest x2 over height and width, then conv 3x3x3 + BatchNorm3d + ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(_upsample(x))))


class ResBlock3d(nn.Module):
    """Pre-activation residual block: (BatchNorm3d, ReLU, conv) x 2 + identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm1 = nn.BatchNorm3d(channels)
        self.norm2 = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out))) + x


class SpectralNormConv2d(nn.Module):
    """Conv2d under eval-mode spectral norm: weight = weight_orig / (u . (W v)), W = weight_orig as (out, -1), with the
    stored u and v (no power iteration, as torch's spectral_norm in eval).

    The checkpoint's three tensors stay the state dict; the effective weight is a non-persistent buffer folded once
    at construction and after every `load_state_dict` (a post-hook), never per frame. Call `fold()` after changing
    `weight_orig`, `weight_u` or `weight_v` any other way."""

    # Buffers, registered in __init__: declared so that they type as tensors, not as nn.Module.__getattr__'s union.
    weight_u: torch.Tensor
    weight_v: torch.Tensor
    weight: torch.Tensor

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True) -> None:
        super().__init__()
        reference = nn.Conv2d(cin, cout, kernel, bias=bias)  # torch's default init, for a usable unloaded module
        self.weight_orig = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone()) if reference.bias is not None else None
        self.register_buffer("weight_u", F.normalize(torch.randn(cout), dim=0))
        self.register_buffer("weight_v", F.normalize(torch.randn(cin * kernel * kernel), dim=0))
        self.register_buffer("weight", torch.empty_like(self.weight_orig), persistent=False)
        self.padding = kernel // 2
        self.fold()
        self.register_load_state_dict_post_hook(_fold_after_load)

    @torch.no_grad()
    def fold(self) -> None:
        """Recompute the effective weight in float32 from the stored tensors."""
        matrix = self.weight_orig.float().reshape(self.weight_orig.shape[0], -1)
        sigma = torch.dot(self.weight_u.float(), torch.mv(matrix, self.weight_v.float()))
        self.weight.copy_((self.weight_orig.float() / sigma).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


def _fold_after_load(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, SpectralNormConv2d)
    module.fold()


class SPADE(nn.Module):
    """Spatially-adaptive norm: InstanceNorm (no affine, eps 1e-5) * (1 + gamma) + beta, gamma and beta predicted by
    convs from the segmentation map (here: the warped feature, nearest-resized to x by the caller)."""

    def __init__(self, channels: int, label_channels: int = DECODER_CHANNELS) -> None:
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_channels, SPADE_HIDDEN, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(SPADE_HIDDEN, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(SPADE_HIDDEN, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, segmentation: torch.Tensor) -> torch.Tensor:
        hidden = self.mlp_shared(segmentation)
        normalized = F.instance_norm(x, eps=1e-5)
        return torch.addcmul(self.mlp_beta(hidden), normalized, 1 + self.mlp_gamma(hidden))


class SPADEResnetBlock(nn.Module):
    """Two SPADE -> LeakyReLU(0.2) -> spectral-norm conv 3x3 steps plus a shortcut (SPADE + spectral 1x1 conv when
    the channel count changes)."""

    def __init__(self, fin: int, fout: int) -> None:
        super().__init__()
        middle = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.conv_0 = SpectralNormConv2d(fin, middle, 3)
        self.conv_1 = SpectralNormConv2d(middle, fout, 3)
        self.norm_0 = SPADE(fin)
        self.norm_1 = SPADE(middle)
        if self.learned_shortcut:
            self.conv_s = SpectralNormConv2d(fin, fout, 1, bias=False)
            self.norm_s = SPADE(fin)

    def forward(self, x: torch.Tensor, segmentation: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, segmentation)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, segmentation), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, segmentation), 0.2))
        return shortcut + dx


class SPADEDecoder(nn.Module):
    """Warped feature (B, 256, S/4, S/4) -> image (B, 3, S, S) in (0, 1): six 512-channel SPADE blocks at S/4, then
    nearest x2 + block to 256 channels, nearest x2 + block to 64, conv to RGB and a sigmoid."""

    MIDDLE = tuple(f"G_middle_{i}" for i in range(6))

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Conv2d(DECODER_CHANNELS, 2 * DECODER_CHANNELS, 3, padding=1)
        for name in self.MIDDLE:
            self.add_module(name, SPADEResnetBlock(2 * DECODER_CHANNELS, 2 * DECODER_CHANNELS))
        self.up_0 = SPADEResnetBlock(2 * DECODER_CHANNELS, DECODER_CHANNELS)
        self.up_1 = SPADEResnetBlock(DECODER_CHANNELS, 64)
        self.conv_img = nn.Conv2d(64, 3, 3, padding=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        x = self.fc(feature)
        for name in self.MIDDLE:
            x = getattr(self, name)(x, feature)
        # Nearest-resizing the map once per resolution: x2 of x2 picks the same pixels as upstream's direct x4.
        segmentation = _upsample(feature)
        x = self.up_0(_upsample(x), segmentation)
        x = self.up_1(_upsample(x), _upsample(segmentation))
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))


# ---------------------------------------------------------------------------------------------------- KP detector


class AntiAliasDownsample(nn.Module):
    """Gaussian blur (sigma 1.5, 13x13, depthwise) then every 4th pixel; the kernel is the checkpoint's buffer
    `weight`, used as stored. Equivalent to upstream's pad-convolve-slice in one strided conv."""

    weight: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, channels: int = 3, scale: float = 0.25) -> None:
        super().__init__()
        sigma = (1 / scale - 1) / 2
        size = 2 * round(sigma * 4) + 1
        taps = torch.exp(-((torch.arange(size, dtype=torch.float32) - size // 2) ** 2) / (2 * sigma**2))
        kernel = torch.outer(taps, taps)
        self.register_buffer("weight", (kernel / kernel.sum()).expand(channels, 1, size, size).clone())
        self.stride = round(1 / scale)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, self.weight, stride=self.stride, padding=self.weight.shape[-1] // 2,
                        groups=self.weight.shape[0])


class KPHourglass(nn.Module):
    """2-D encoder 3 -> 1024 channels (S/4 -> S/128), 1x1 conv to 16384 = 1024 x depth 16, 3-D decoder to 32 x 16 x
    S/4 x S/4."""

    def __init__(self, channels: tuple[int, ...] = (3, 64, 128, 256, 512, 1024), reshaped: int = 16384) -> None:
        super().__init__()
        self.down_blocks = nn.Sequential(OrderedDict(
            (f"down{i}", DownBlock2d(cin, cout)) for i, (cin, cout) in enumerate(zip(channels, channels[1:]))))
        self.conv = nn.Conv2d(channels[-1], reshaped, 1)
        ups = (reshaped // DEPTH, 512, 256, 128, 64, 32)
        self.up_blocks = nn.Sequential(OrderedDict(
            (f"up{i}", UpBlock3d(cin, cout)) for i, (cin, cout) in enumerate(zip(ups, ups[1:]))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.down_blocks(x))
        return self.up_blocks(out.unflatten(1, (out.shape[1] // DEPTH, DEPTH)))


class KPDetector(nn.Module):
    """Source image (B, 3, S, S) RGB in [0, 1] -> 15 canonical 3-D keypoints (B, 15, 3) float32 in the [-1, 1] cube
    (x, y, z): a soft-argmax (temperature 0.1) over 15 heatmap volumes of 16 x S/4 x S/4. Run once per portrait."""

    def __init__(self) -> None:
        super().__init__()
        self.down = AntiAliasDownsample()
        self.predictor = KPHourglass()
        self.kp = nn.Conv3d(32, NUM_KP, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.kp(self.predictor(self.down(image)))  # (B, 15, 16, S/4, S/4)
        warp_dtype = _warp_dtype(logits.dtype)
        grid = coordinate_grid(*logits.shape[2:], device=logits.device).to(warp_dtype)
        weights = torch.softmax(logits.flatten(2).to(warp_dtype) / KP_TEMPERATURE, dim=2).view(logits.shape)
        # An elementwise sum, as upstream: keypoints are ~0.02 from weights x coordinates of magnitude 1, and a
        # matmul's different fp32 accumulation order alone moves them by ~1e-4 of their size.
        return (weights[..., None] * grid).sum(dim=(2, 3, 4))


# ------------------------------------------------------------------------------------------------------ generator


class HourglassEncoder(nn.Module):
    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList(DownBlock3d(cin, cout) for cin, cout in zip(channels, channels[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class HourglassDecoder(nn.Module):
    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        widths = channels[1:][::-1]  # 1024, 512, 256, 128, 64
        self.up_blocks = nn.ModuleList(
            UpBlock3d(cin if i == 0 else 2 * cin, cout)
            for i, (cin, cout) in enumerate(zip(widths, (*widths[1:], widths[-1] // 2))))
        out = widths[-1] // 2 + channels[0]
        self.conv = nn.Conv3d(out, out, 3, padding=1)
        self.norm = nn.BatchNorm3d(out)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        out = skips[-1]
        for block, skip in zip(self.up_blocks, reversed(skips[:-1])):
            out = torch.cat([block(out), skip], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass3d(nn.Module):
    """3-D U-Net over (B, 80, 16, S/4, S/4): five H/W halvings to 1024 channels and back, output 32 + 80 = 112
    channels (the input is concatenated back in)."""

    def __init__(self, channels: tuple[int, ...] = (80, 64, 128, 256, 512, 1024)) -> None:
        super().__init__()
        self.encoder = HourglassEncoder(channels)
        self.decoder = HourglassDecoder(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _gaussians(axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor], keypoints: torch.Tensor) -> torch.Tensor:
    """exp(-0.5 |g - kp|^2 / 0.01) on the grid (B, K, 3) -> (B, K, D, H, W), as the product of three 1-D Gaussians
    (same value, ~3 ulp, at a fraction of the cost)."""
    x, y, z = axes

    def along(axis: torch.Tensor, coordinate: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * (axis - coordinate[..., None]) ** 2 / KP_VARIANCE)

    gz = along(z, keypoints[..., 2])[..., :, None, None]
    gy = along(y, keypoints[..., 1])[..., None, :, None]
    gx = along(x, keypoints[..., 0])[..., None, None, :]
    return gz * gy * gx


class DenseMotionNetwork(nn.Module):
    """Keypoints -> a dense backward-warp field (B, 16, S/4, S/4, 3) and an occlusion map (B, 1, S/4, S/4).

    Per keypoint k a rigid sparse motion (grid - kp_driving_k + kp_source_k, plus the identity as background), the
    compressed source volume warped by each, and the driving-minus-source Gaussian heatmaps feed a 3-D hourglass;
    its softmax mask over the 16 motions (weights < 1e-3 zeroed, not renormalised) blends them."""

    def __init__(self, compressed: int = 4) -> None:
        super().__init__()
        self.hourglass = Hourglass3d()
        self.mask = nn.Conv3d(112, NUM_KP + 1, 7, padding=3)
        self.compress = nn.Conv3d(32, compressed, 1)
        self.norm = nn.BatchNorm3d(compressed)
        self.occlusion = nn.Conv2d(112 * DEPTH, 1, 7, padding=3)

    def compress_source(self, feature_3d: torch.Tensor) -> torch.Tensor:
        """(N, 32, 16, h, w) -> (N, 4, 16, h, w): depends on the source only, so it lives in `SourceEncoding`."""
        return F.relu(self.norm(self.compress(feature_3d)))

    def forward(self, motion_feature: torch.Tensor, identity_grid: torch.Tensor, kp_source: torch.Tensor,
                kp_driving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """motion_feature (N, 4, d, h, w) float32 (N = 1 or B), identity_grid (d, h, w, 3), keypoints (1 or B, 15, 3)
        and (B, 15, 3) float32 -> deformation (B, d, h, w, 3) float32, occlusion (B, 1, h, w) in the conv dtype."""
        frames = kp_driving.shape[0]
        dtype = self.mask.weight.dtype
        kp_source = kp_source.expand(frames, -1, -1)
        background = kp_driving.new_zeros(frames, 1, 3)
        driving = torch.cat([background, kp_driving], dim=1)[:, :, None, None, None, :]  # (B, 16, 1, 1, 1, 3)
        source = torch.cat([background, kp_source], dim=1)[:, :, None, None, None, :]
        motions = identity_grid - driving + source  # (B, 16, d, h, w, 3)
        depth, height, width = identity_grid.shape[:3]

        deformed = _sample(motion_feature, motions.flatten(1, 2))  # (B, 4, 16 d, h, w)
        deformed = deformed.unflatten(2, (NUM_KP + 1, depth)).transpose(1, 2)  # (B, 16, 4, d, h, w)
        axes = (identity_grid[0, 0, :, 0], identity_grid[0, :, 0, 1], identity_grid[:, 0, 0, 2])
        heatmaps = _gaussians(axes, kp_driving) - _gaussians(axes, kp_source)  # (B, 15, d, h, w)
        heatmaps = torch.cat([heatmaps.new_zeros(frames, 1, depth, height, width), heatmaps], dim=1)
        hourglass_in = torch.cat([heatmaps[:, :, None], deformed], dim=2).flatten(1, 2)  # (B, 80, d, h, w)

        prediction = self.hourglass(hourglass_in.to(dtype))  # (B, 112, d, h, w)
        mask = torch.softmax(self.mask(prediction).to(motions.dtype), dim=1)
        mask = torch.where(mask < MASK_FLOOR, torch.zeros_like(mask), mask)
        deformation = (mask[..., None] * motions).sum(dim=1)
        occlusion = torch.sigmoid(self.occlusion(prediction.flatten(1, 2)))
        return deformation, occlusion


@dataclass(frozen=True, slots=True)
class SourceEncoding:
    """What the generator derives from the portrait alone (upstream recomputes it every frame). Batch N = 1 to share
    one portrait across any number of frames, or N = the frame batch."""

    feature_3d: torch.Tensor  # (N, 32, 16, S/4, S/4): the appearance volume warped every frame
    motion_feature: torch.Tensor  # (N, 4, 16, S/4, S/4): dense motion's compressed volume
    identity_grid: torch.Tensor  # (16, S/4, S/4, 3): the (x, y, z) coordinate grid of those volumes
    # all three float32 (float64 for a float64 network): the warps read them with grid_sample


class OcclusionAwareSPADEGenerator(nn.Module):
    """(source image, source keypoints, driving keypoints) -> the source face moved to the driving keypoints.

    Source (N, 3, S, S) RGB in [0, 1] -> 3-D feature volume (32 x 16 x S/4 x S/4) -> warped by the dense motion
    field -> 2-D feature (256 x S/4 x S/4) times the occlusion map -> SPADE decoder -> (B, 3, S, S) in (0, 1).
    S must be a multiple of 128: the dense-motion hourglass halves S/4 five times and concatenates skips."""

    def __init__(self) -> None:
        super().__init__()
        self.dense_motion_network = DenseMotionNetwork()
        self.first = SameBlock2d(3, 64)
        self.down_blocks = nn.ModuleList([DownBlock2d(64, 128), DownBlock2d(128, 256)])
        self.second = nn.Conv2d(256, 512, 1)
        self.resblocks_3d = nn.Sequential(OrderedDict((f"3dr{i}", ResBlock3d(32)) for i in range(6)))
        self.third = SameBlock2d(512, DECODER_CHANNELS, leaky=True)
        self.fourth = nn.Conv2d(DECODER_CHANNELS, DECODER_CHANNELS, 1)
        self.decoder = SPADEDecoder()

    def encode_source(self, source: torch.Tensor) -> SourceEncoding:
        """(N, 3, S, S) -> the source-only volumes, once per portrait."""
        out = self.first(source)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)  # (N, 512, S/4, S/4)
        feature_3d = self.resblocks_3d(out.unflatten(1, (out.shape[1] // DEPTH, DEPTH)))
        motion_feature = self.dense_motion_network.compress_source(feature_3d)
        warp_dtype = _warp_dtype(feature_3d.dtype)
        grid = coordinate_grid(*feature_3d.shape[2:], device=feature_3d.device).to(warp_dtype)
        return SourceEncoding(feature_3d.to(warp_dtype), motion_feature.to(warp_dtype), grid)

    def render(self, encoding: SourceEncoding, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> torch.Tensor:
        """Driving keypoints (B, 15, 3) -> frames (B, 3, S, S) in (0, 1), in the convs' dtype. kp_source is (1, 15, 3)
        or (B, 15, 3); the encoding's batch is 1 or B."""
        warp_dtype = encoding.identity_grid.dtype
        deformation, occlusion = self.dense_motion_network(
            encoding.motion_feature, encoding.identity_grid, kp_source.to(warp_dtype), kp_driving.to(warp_dtype))
        warped = _sample(encoding.feature_3d, deformation)  # (B, 32, 16, h, w) float32
        out = self.third(warped.flatten(1, 2).to(self.fourth.weight.dtype))
        return self.decoder(self.fourth(out) * occlusion)

    def forward(self, source: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> torch.Tensor:
        """Upstream's uncached call (source re-encoded on every call): source (B, 3, S, S) or (1, 3, S, S)."""
        return self.render(self.encode_source(source), kp_source, kp_driving)

