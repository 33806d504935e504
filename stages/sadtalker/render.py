"""The facevid2vid renderer of the SadTalker backend: source encoded once per avatar, driving keypoints in batches.

Upstream recomputes the generator's source encoding for every frame and renders in fixed batches; here the
encoding, the canonical and source keypoints are computed once, and `render_batch` takes whatever batch the render
stage hands it (latency-bounded), split further when a GPU runs out of memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from stages.nets.facevid2vid import use_channels_last
from stages.nets.mapping import keypoint_transformation
from stages.sadtalker.motion import (
    DrivingFrame,
    DrivingSettings,
    MotionNetworks,
    OfflineMotion,
    SadTalkerMotion,
    SourceMotion,
)
from stream.clock import ms_of_seconds
from stream.device import Placement, batch_for_memory, free_memory_bytes, map_in_batches


def to_tensor(rgb_uint8: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 in [0, 1], as upstream reads its crop PNG."""
    return torch.from_numpy(np.ascontiguousarray(rgb_uint8.transpose(2, 0, 1))).float().div(255.0)[None].to(device)


def to_bgr_uint8(prediction: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, S, S) in [0, 1] -> B images (S, S, 3) uint8 BGR."""
    images = prediction.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1)
    return list(images.cpu().numpy())


@dataclass(frozen=True, slots=True)
class GeneratorSettings:
    """How the generator runs: batch ceiling, channels-last, torch.compile."""

    max_batch: int = 8
    channels_last: bool = True
    compile: bool = False


class FacevidRenderer:
    """Driving keypoints -> face crops (S×S, BGR uint8), with everything that depends on the source cached."""

    def __init__(self, kp_detector: Any, generator: Any, mapping: Any, source_rgb: np.ndarray,
                 source_coefficients: np.ndarray, placement: Placement, settings: GeneratorSettings) -> None:
        self.placement = placement
        self.settings = settings
        device = torch.device(placement.device)
        self.generator = generator.to(device)
        source = to_tensor(source_rgb, device)
        with torch.inference_mode():
            kp_canonical = kp_detector.to(device)(source)
            semantics = torch.as_tensor(source_coefficients, device=device)[None, :, None].expand(1, -1, 27)
            self.kp_source = keypoint_transformation(kp_canonical, mapping.to(device)(semantics.contiguous()))
        self.source_motion = SourceMotion(np.asarray(source_coefficients, np.float32), kp_canonical)
        self.generator = self.generator.to(dtype=placement.dtype)
        self.source = source.to(dtype=placement.dtype)
        if settings.channels_last:
            use_channels_last(self.generator)
            self.source = self.source.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            self.encoding = self.generator.encode_source(self.source)
        self._render = torch.compile(self.generator.render) if settings.compile else self.generator.render
        self.batch = settings.max_batch

    @property
    def size(self) -> int:
        return int(self.source.shape[-1])

    def render_keypoints(self, keypoints: torch.Tensor) -> torch.Tensor:
        """(B, 15, 3) driving keypoints -> (B, 3, S, S) predictions in [0, 1] (the renderer's dtype)."""
        with torch.inference_mode():
            kp_source = self.kp_source.expand(len(keypoints), -1, -1)
            return self._render(self.encoding, kp_source, keypoints.to(self.placement.device))

    def touch_for(self, frame: DrivingFrame) -> None:
        """The generator's crop is the whole face: nothing to draw again at the frame's resolution."""
        return None

    def render_batch(self, frames: Sequence[DrivingFrame]) -> list[np.ndarray]:
        def run(part: Sequence[DrivingFrame]) -> list[np.ndarray]:
            return to_bgr_uint8(self.render_keypoints(torch.stack([frame.keypoints for frame in part])))

        def shrink(batch: int) -> None:
            self.batch = batch

        return map_in_batches(run, frames, self.batch, shrink)

    def measure_batch(self) -> int:
        """On CUDA, the largest batch (up to the setting) that free memory holds, from one measured frame."""
        free = free_memory_bytes(self.placement)
        if free is None or self.settings.max_batch == 1:
            return self.batch
        keypoints = self.kp_source.expand(2, -1, -1).clone()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self.render_keypoints(keypoints)
        torch.cuda.synchronize()
        per_frame = (torch.cuda.max_memory_allocated() - before) // 2
        self.batch = batch_for_memory(per_frame, free, self.settings.max_batch)
        return self.batch


def rectangle_mask(height: int, width: int, feather: float = 0.06) -> np.ndarray:
    """Paste-back weights for a rendered rectangle: 1 inside, a smoothstep to 0 over `feather` of the side at the
    edges, so that head motion near the crop border does not show a seam (upstream pastes the hard rectangle)."""
    def ramp(length: int) -> np.ndarray:
        edge = max(1.0, feather * length)
        distance = np.minimum(np.arange(length) + 0.5, length - np.arange(length) - 0.5)
        t = np.clip(distance / edge, 0.0, 1.0)
        return t * t * (3.0 - 2.0 * t)

    return np.outer(ramp(height), ramp(width)).astype(np.float32)


@dataclass(frozen=True, slots=True)
class SadTalkerFace:
    """A portrait prepared for the SadTalker backend: the picture frames are made of, where the render goes, the
    renderer with its cached source, and the networks sessions drive it with."""

    image: np.ndarray                      # (H, W, 3) uint8 BGR, even sides
    roi: tuple[int, int, int, int]         # where each rendered crop is pasted
    mask: np.ndarray                       # (roi h, roi w) float32 paste-back weights
    renderer: FacevidRenderer
    networks: Any                          # stages.nets.checkpoints.SadTalkerNetworks
    landmarks: np.ndarray                  # (68, 2) float32: the portrait's face in `image` pixels

    def landmark_locator(self, detector: Any) -> Callable[[np.ndarray], np.ndarray]:
        """Frame (BGR) -> the 68 points it shows, by `detector.landmarks_in` on the portrait's face box: the
        rendered head turns a few degrees at most, so the box still holds the face and nothing is detected per
        frame. The box is the detector's own on the picture (its predictor is trained on such boxes), found once."""
        height, width = self.image.shape[:2]
        centre = self.landmarks.mean(axis=0)
        faces = detector.detect(cv2.cvtColor(self.image, cv2.COLOR_BGR2RGB))
        if faces:
            face = min(faces, key=lambda found: float(np.linalg.norm(found.landmarks.mean(axis=0) - centre)))
            left, top, right, bottom = face.box
        else:  # a face the detector misses at this size: the landmarks' own bounds are the next best box
            (left, top), (right, bottom) = self.landmarks.min(axis=0), self.landmarks.max(axis=0)
        margin = 0.25 * max(right - left, bottom - top)
        x0, y0 = max(0, int(left - margin)), max(0, int(top - margin))
        x1, y1 = min(width, int(right + margin) + 1), min(height, int(bottom + margin) + 1)
        box = (left - x0, top - y0, right - x0, bottom - y0)
        corner = np.array([x0, y0], np.float32)

        def locate(frame: np.ndarray) -> np.ndarray:
            rgb = cv2.cvtColor(frame[y0:y1, x0:x1], cv2.COLOR_BGR2RGB)
            return detector.landmarks_in(rgb, box) + corner

        return locate

    def motion_model(self, settings: DrivingSettings, *, offline: bool) -> SadTalkerMotion | OfflineMotion:
        """A fresh motion model per session (it holds the session's utterance state)."""
        networks = MotionNetworks(self.networks.audio2exp, self.networks.audio2pose, self.networks.mapping,
                                  self.renderer.source_motion, settings, self.renderer.placement.device)
        return OfflineMotion(networks) if offline else SadTalkerMotion(networks)


def prepare_face(networks: Any, image: np.ndarray, landmarks: np.ndarray, *, crop_mode: str, size: int,
                 placement: Placement, settings: GeneratorSettings) -> SadTalkerFace:
    """Crop as upstream does, fit the 3DMM coefficients once, encode the source once.

    `image` is the portrait (BGR) and `landmarks` its dlib 68 points in the same pixels.
    """
    from stages.nets.face3d import coefficients_70
    from stages.sadtalker.crop import align_to_224, sadtalker_crop

    crop = sadtalker_crop(image, landmarks, crop_mode, size)
    aligned, trans_params = align_to_224(crop.source, crop.landmarks)
    face_input = to_tensor(aligned)
    with torch.inference_mode():
        coefficients = coefficients_70(networks.face_3drecon(face_input))[0].numpy()
    if networks.files.mapping_inputs == 73:
        coefficients = np.concatenate([coefficients, np.asarray(trans_params[2:5], np.float32)])
    renderer = FacevidRenderer(networks.kp_extractor, networks.generator, networks.mapping, crop.source,
                               coefficients.astype(np.float32), placement, settings)
    if crop.paste_box is not None:
        x0, y0, x1, y1 = crop.paste_box
        return SadTalkerFace(image, crop.paste_box, rectangle_mask(y1 - y0, x1 - x0), renderer, networks,
                             np.asarray(landmarks, np.float32))
    # The face crop is the video, at upstream's output size (S, S·h/w), rounded to even sides for yuv420p.
    x0, y0, x1, y1 = crop.region
    width, height = (2 * max(1, side // 2) for side in crop.restored_wh())
    picture = cv2.resize(image[y0:y1, x0:x1], (width, height), interpolation=cv2.INTER_AREA)
    in_picture = (landmarks - np.array([x0, y0])) * np.array([width / (x1 - x0), height / (y1 - y0)])
    return SadTalkerFace(picture, (0, 0, width, height), np.ones((height, width), np.float32), renderer, networks,
                         in_picture.astype(np.float32))


def renderer_speed(renderer: FacevidRenderer, frames: int) -> dict[str, Any]:
    """Time `frames` driving poses through the cached batched path and through the uncached per-frame path."""
    import time

    def synchronise() -> None:
        if renderer.placement.is_cuda:
            torch.cuda.synchronize()

    offsets = torch.linspace(-0.05, 0.05, frames, device=renderer.kp_source.device)[:, None, None]
    keypoints = renderer.kp_source.expand(frames, -1, -1) + offsets
    batch = max(1, min(renderer.batch, frames))
    renderer.render_keypoints(keypoints[:batch])  # warm-up (and compilation, if asked)
    synchronise()
    started = time.perf_counter()
    for first in range(0, frames, batch):
        renderer.render_keypoints(keypoints[first:first + batch])
    synchronise()
    cached = (time.perf_counter() - started) / frames
    with torch.inference_mode():
        started = time.perf_counter()
        for row in range(frames):
            renderer.generator(renderer.source, renderer.kp_source, keypoints[row:row + 1])
        synchronise()
    uncached = (time.perf_counter() - started) / frames
    return {"size": renderer.size, "device": renderer.placement.device, "precision": renderer.placement.precision,
            "batch": batch, "frames": frames, "cached_ms_per_frame": ms_of_seconds(cached),
            "uncached_ms_per_frame": ms_of_seconds(uncached), "speedup": uncached / cached}
