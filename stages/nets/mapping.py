"""SadTalker's MappingNet and the keypoint transformation that turns its output into face-vid2vid keypoints.

MappingNet reads a 27-frame window of 3DMM coefficients (70 per frame; 73 in the `full` crop modes) centred on a
frame and predicts that frame's head pose (66-bin yaw/pitch/roll logits), translation and per-keypoint expression
offsets. Loads the official `mapping` state dicts strictly (no prefix).

The transformation reproduces upstream's arithmetic exactly, quirks included: degrees -> radians with 3.14 (not pi),
R = Rx(pitch) Ry(yaw) Rz(roll), and only the y translation kept. Everything here runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NUM_KP = 15
NUM_BINS = 66  # 3-degree bins covering [-99, 96] degrees
_PI_AS_UPSTREAM = 3.14


@dataclass(frozen=True, slots=True)
class HeadMotion:
    """MappingNet's output for a batch of frames."""

    yaw: torch.Tensor  # (B, 66) bin logits
    pitch: torch.Tensor  # (B, 66)
    roll: torch.Tensor  # (B, 66)
    t: torch.Tensor  # (B, 3) translation; only y is used
    exp: torch.Tensor  # (B, 45) = 15 keypoints x (x, y, z) offsets


class MappingNet(nn.Module):
    """Coefficient windows (B, coeff_nc, 27) -> `HeadMotion`: conv k7 to 1024 (27 -> 21 steps), three residual
    LeakyReLU(0.1) + dilated conv k3 steps (21 -> 15 -> 9 -> 3), mean over time, five linear heads."""

    def __init__(self, coeff_nc: int = 70, descriptor_nc: int = 1024) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv1d(coeff_nc, descriptor_nc, 7))
        self.encoder0 = self._residual_step(descriptor_nc)
        self.encoder1 = self._residual_step(descriptor_nc)
        self.encoder2 = self._residual_step(descriptor_nc)
        self.fc_roll = nn.Linear(descriptor_nc, NUM_BINS)
        self.fc_pitch = nn.Linear(descriptor_nc, NUM_BINS)
        self.fc_yaw = nn.Linear(descriptor_nc, NUM_BINS)
        self.fc_t = nn.Linear(descriptor_nc, 3)
        self.fc_exp = nn.Linear(descriptor_nc, 3 * NUM_KP)

    @staticmethod
    def _residual_step(channels: int) -> nn.Sequential:
        return nn.Sequential(nn.LeakyReLU(0.1), nn.Conv1d(channels, channels, 3, dilation=3))

    def forward(self, coefficients: torch.Tensor) -> HeadMotion:
        out = self.first(coefficients)
        for step in (self.encoder0, self.encoder1, self.encoder2):
            out = step(out) + out[:, :, 3:-3]  # the dilated conv trims 3 steps each side
        out = out.mean(dim=2)
        return HeadMotion(yaw=self.fc_yaw(out), pitch=self.fc_pitch(out), roll=self.fc_roll(out),
                          t=self.fc_t(out), exp=self.fc_exp(out))


def headpose_to_degrees(bins: torch.Tensor) -> torch.Tensor:
    """(B, 66) bin logits -> (B,) degrees: the soft-argmax bin index * 3 - 99."""
    index = torch.arange(bins.shape[1], dtype=torch.float32, device=bins.device)
    return (torch.softmax(bins.float(), dim=1) * index).sum(dim=1) * 3 - 99


def rotation_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Angles (B,) in degrees -> (B, 3, 3) R = Rx(pitch) Ry(yaw) Rz(roll), with upstream's 3.14 for pi."""
    yaw, pitch, roll = (angle.float() / 180 * _PI_AS_UPSTREAM for angle in (yaw, pitch, roll))
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)

    def matrix(*rows: torch.Tensor) -> torch.Tensor:
        return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))

    about_x = matrix(one, zero, zero, zero, pitch.cos(), -pitch.sin(), zero, pitch.sin(), pitch.cos())
    about_y = matrix(yaw.cos(), zero, yaw.sin(), zero, one, zero, -yaw.sin(), zero, yaw.cos())
    about_z = matrix(roll.cos(), -roll.sin(), zero, roll.sin(), roll.cos(), zero, zero, zero, one)
    return about_x @ about_y @ about_z


def _override(angle: torch.Tensor | float | None, bins: torch.Tensor) -> torch.Tensor:
    if angle is None:
        return headpose_to_degrees(bins)
    return torch.as_tensor(angle, dtype=torch.float32, device=bins.device).expand(bins.shape[0])


def keypoint_transformation(kp_canonical: torch.Tensor, motion: HeadMotion,
                            yaw: torch.Tensor | float | None = None, pitch: torch.Tensor | float | None = None,
                            roll: torch.Tensor | float | None = None) -> torch.Tensor:
    """Canonical keypoints (1 or B, 15, 3) + head motion (batch B) -> posed keypoints (B, 15, 3) float32:
    R kp + (0, t_y, 0) + exp. yaw/pitch/roll (degrees; a number or (B,)) replace the predicted angles (free view)."""
    rotation = rotation_matrix(_override(yaw, motion.yaw), _override(pitch, motion.pitch),
                               _override(roll, motion.roll))
    rotated = kp_canonical.float() @ rotation.transpose(1, 2)
    translation = motion.t.float() * torch.tensor([0.0, 1.0, 0.0], device=motion.t.device)
    return rotated + translation[:, None, :] + motion.exp.float().unflatten(1, (-1, 3))
