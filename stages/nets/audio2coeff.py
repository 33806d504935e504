"""SadTalker's audio-side networks: audio2exp (mel windows -> 64 expression coefficients) and the inference half of
audio2pose (a CVAE decoder: noise, pose style and 32 mel windows -> 32 frames of head motion).

Both load the official state dicts strictly (safetensors prefixes `audio2exp.` / `audio2pose.` stripped); audio2pose's
training-only parts (`netG.encoder.*`, `netD_motion.*`) are not built, so the caller drops those keys.
Every normalisation is BatchNorm in eval mode, so each frame (audio2exp) and each chunk (audio2pose) is computed
independently of what else shares its batch.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

MEL_BANDS = 80
MEL_STEPS = 16  # mel columns per video frame window
AUDIO_EMBEDDING = 512
EXP_COEFFS = 64
POSE_COEFFS = 6  # yaw, pitch, roll (radians) and translation x, y, z
POSE_CHUNK_FRAMES = 32  # audio2pose decodes this many frames at once; its MLP is sized for it
POSE_LATENT = 64
POSE_STYLES = 46  # learned latent offsets, chosen by `--pose_style` 0-45 upstream
_AUDIO_PER_FRAME = 6  # audio2pose squeezes each frame's 512-d embedding to 6 before its MLP


class ConvBlock(nn.Module):
    """Wav2Lip's unit: conv + BatchNorm (+ identity when shapes allow) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int | tuple[int, int], padding: int,
                 residual: bool = False) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        return self.act(out + x if self.residual else out)


class AudioEncoder(nn.Sequential):
    """Wav2Lip's audio encoder: one 80x16 mel window -> a 512-d embedding.

    Spatial trace: 80x16 -> (3,1) stride 27x16 -> 3 stride 9x6 -> (3,2) stride 3x3 -> 3x3 valid conv 1x1.
    """

    def __init__(self) -> None:
        # (cin, cout, kernel, stride, padding, residual)
        layout: list[tuple[int, int, int, int | tuple[int, int], int, bool]] = [
            (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
            (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
            (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
            (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
            (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
        ]
        super().__init__(*(ConvBlock(*spec) for spec in layout))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:  # (N, 1, 80, 16) -> (N, 512)
        return super().forward(windows).flatten(1)


class Audio2Exp(nn.Module):
    """audio2exp (SimpleWrapperV2): each frame's expression from its mel window, the source's expression and the
    blink ratio, through one linear layer. Stateless per frame: frames may be batched in any grouping."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = AudioEncoder()
        self.mapping1 = nn.Linear(AUDIO_EMBEDDING + EXP_COEFFS + 1, EXP_COEFFS)

    def forward(self, windows: torch.Tensor, ref_exp: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
        """windows (..., 1, 80, 16), ref_exp (..., 64), blink (..., 1) with the same leading dims (e.g. (B, T))
        -> absolute expression coefficients (..., 64)."""
        leading = ref_exp.shape[:-1]
        audio = self.audio_encoder(windows.reshape(-1, 1, MEL_BANDS, MEL_STEPS))
        features = torch.cat([audio, ref_exp.reshape(-1, EXP_COEFFS), blink.reshape(-1, 1)], dim=1)
        return self.mapping1(features).reshape(*leading, EXP_COEFFS)


class ResidualConv(nn.Module):
    """Pre-activation residual unit of the pose ResUnet; strides act along time only."""

    def __init__(self, cin: int, cout: int, stride: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, stride, 1),
            nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1),
        )
        self.conv_skip = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x) + self.conv_skip(x)


class TimeUpsample(nn.Module):
    """Doubles the time axis with a learned (2, 1) transposed convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(channels, channels, (2, 1), (2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class PoseResUnet(nn.Module):
    """A small U-Net over the (time 32 x pose 6) motion "image": three time halvings, three doublings with skips."""

    def __init__(self, filters: tuple[int, int, int, int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        f0, f1, f2, f3 = filters
        self.input_layer = nn.Sequential(nn.Conv2d(1, f0, 3, 1, 1), nn.BatchNorm2d(f0), nn.ReLU(),
                                         nn.Conv2d(f0, f0, 3, 1, 1))
        self.input_skip = nn.Sequential(nn.Conv2d(1, f0, 3, 1, 1))
        self.residual_conv_1 = ResidualConv(f0, f1, (2, 1))
        self.residual_conv_2 = ResidualConv(f1, f2, (2, 1))
        self.bridge = ResidualConv(f2, f3, (2, 1))
        self.upsample_1 = TimeUpsample(f3)
        self.up_residual_conv1 = ResidualConv(f3 + f2, f2, 1)
        self.upsample_2 = TimeUpsample(f2)
        self.up_residual_conv2 = ResidualConv(f2 + f1, f1, 1)
        self.upsample_3 = TimeUpsample(f1)
        self.up_residual_conv3 = ResidualConv(f1 + f0, f0, 1)
        self.output_layer = nn.Sequential(nn.Conv2d(f0, 1, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 32, 6) -> (B, 1, 32, 6) in (0, 1)
        x1 = self.input_layer(x) + self.input_skip(x)  # 32 steps
        x2 = self.residual_conv_1(x1)  # 16
        x3 = self.residual_conv_2(x2)  # 8
        x4 = self.bridge(x3)  # 4
        x5 = self.up_residual_conv1(torch.cat([self.upsample_1(x4), x3], dim=1))
        x6 = self.up_residual_conv2(torch.cat([self.upsample_2(x5), x2], dim=1))
        x7 = self.up_residual_conv3(torch.cat([self.upsample_3(x6), x1], dim=1))
        return self.output_layer(x7)


class PoseDecoder(nn.Module):
    """audio2pose's CVAE decoder: (z + style bias, reference pose, per-frame audio) -> 32 frames of motion."""

    def __init__(self) -> None:
        super().__init__()
        mlp_in = POSE_COEFFS + POSE_LATENT + POSE_CHUNK_FRAMES * _AUDIO_PER_FRAME
        mlp_out = POSE_CHUNK_FRAMES * POSE_COEFFS
        self.resunet = PoseResUnet()
        self.MLP = nn.Sequential(OrderedDict(L0=nn.Linear(mlp_in, 128), A0=nn.ReLU(), L1=nn.Linear(128, mlp_out),
                                             sigmoid=nn.Sigmoid()))
        self.pose_linear = nn.Linear(POSE_COEFFS, POSE_COEFFS)
        self.linear_audio = nn.Linear(AUDIO_EMBEDDING, _AUDIO_PER_FRAME)
        self.classbias = nn.Parameter(torch.zeros(POSE_STYLES, POSE_LATENT))

    def forward(self, z: torch.Tensor, audio: torch.Tensor, ref_pose: torch.Tensor,
                style: torch.Tensor) -> torch.Tensor:
        """z (B, 64), audio embeddings (B, 32, 512), ref_pose (B, 6), style (B,) int64 -> motion (B, 32, 6)."""
        batch = z.shape[0]
        latent = z + self.classbias[style]
        per_frame_audio = self.linear_audio(audio).reshape(batch, -1)
        hidden = self.MLP(torch.cat([ref_pose, latent, per_frame_audio], dim=1))
        motion = self.resunet(hidden.reshape(batch, 1, POSE_CHUNK_FRAMES, POSE_COEFFS))
        return self.pose_linear(motion.squeeze(1))


class PoseGenerator(nn.Module):
    """The inference path of audio2pose for one 32-frame chunk at a time.

    `embed_audio` runs the (separately weighted) audio encoder on mel windows; a streaming caller embeds each frame
    once as it arrives and reuses the embeddings across overlapping chunks. Upstream's batch>1 mis-ordering of the
    embeddings does not exist here: any batch equals its chunks run one by one.
    """

    def __init__(self) -> None:
        super().__init__()
        # The nesting only reproduces the checkpoint's key names (audio_encoder.audio_encoder.*, netG.decoder.*).
        self.audio_encoder = nn.ModuleDict({"audio_encoder": AudioEncoder()})
        self.netG = nn.ModuleDict({"decoder": PoseDecoder()})

    def embed_audio(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (..., 1, 80, 16) -> embeddings (..., 512), leading dims kept."""
        leading = windows.shape[:-3]
        flat = self.audio_encoder["audio_encoder"](windows.reshape(-1, 1, MEL_BANDS, MEL_STEPS))
        return flat.reshape(*leading, AUDIO_EMBEDDING)

    def forward(self, z: torch.Tensor, audio: torch.Tensor, ref_pose: torch.Tensor,
                style: torch.Tensor) -> torch.Tensor:
        """z (B, 64) noise; audio: mel windows (B, 32, 1, 80, 16) or their embeddings (B, 32, 512); ref_pose (B, 6)
        the source's angles and translation; style (B,) ints 0-45 -> motion (B, 32, 6), added to ref_pose upstream."""
        embeddings = self.embed_audio(audio) if audio.dim() == 5 else audio
        return self.netG["decoder"](z, embeddings, ref_pose, style.long())

    decode = forward  # the name streaming callers read best
