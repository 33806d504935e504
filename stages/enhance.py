"""Enhance stage core: face enhancement of finished frames, inside the avatar's ROI only, chosen by name.

`light` (unsharp mask + CLAHE on luma) costs well under a millisecond and runs everywhere. `gfpgan` and
`restoreformer` run the gfpgan package's networks with the user's weights, batched, on the face the pipeline already
knows: each frame's five points (from the landmarks the renderer moved, or dlib's predictor on the known face box)
give one similarity to the 512² template those networks were trained on; the restored faces are warped back and
faded in by the face mask. Nothing is detected per frame and nothing is downloaded.

`resolve_enhancer` turns a preset's wish (`auto`, `best`, a name) into what this install can run; `make_enhancer`
builds it for one avatar.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import cv2
import numpy as np
import numpy.typing as npt

from stages.portrait import five_points
from stream.errors import PresetError

if TYPE_CHECKING:
    from stream.device import Placement

Roi = tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels, exclusive end
NEURAL_ENHANCERS = ("gfpgan", "restoreformer")
ENHANCERS = ("none", "light", *NEURAL_ENHANCERS)
WISHES = (*ENHANCERS, "auto", "best")  # what a preset may ask for
# The five points (eye centres, nose tip, mouth corners) of the 512² FFHQ-aligned faces GFPGAN and RestoreFormer
# were trained on (the template of their face helper).
TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                         [201.26117, 371.41043], [313.08905, 371.15118]], np.float32)


class Enhancer(Protocol):
    def enhance_batch(self, frames: Sequence[np.ndarray], landmarks: Sequence[np.ndarray | None]) -> None:
        """Improve each frame (H, W, 3 uint8 BGR) in place, inside the avatar's ROI only. `landmarks[i]` holds the
        68 points frame i shows (frame pixels), or None where the renderer does not know them."""


class LightEnhancer:
    """Unsharp mask + CLAHE on luma, faded in by the face mask so the enhanced area has no edge.

    Works on luma only and adds the luma change to B, G and R alike: since Y = 0.299 R + 0.587 G + 0.114 B with
    weights summing to 1, that shifts Y by exactly the change and leaves Cr and Cb untouched (up to clipping) —
    the same result as a YCrCb round trip at the cost of one BGR->gray conversion.
    Not thread-safe: scratch buffers and the CLAHE object are reused per call.
    """

    def __init__(
        self,
        roi: Roi,
        mask: np.ndarray,
        *,
        amount: float = 0.5,
        clahe_clip: float = 2.0,
        clahe_strength: float = 0.2,
    ) -> None:
        """`amount` scales the detail unsharp masking adds back (0 = none); `clahe_clip` is CLAHE's clip limit.

        `clahe_strength` mixes the CLAHE result into the luma (0 = off, 1 = all of it): full-strength CLAHE at
        clip 2 visibly darkens and roughens a well-lit face (mean change ~16 grey levels on the astronaut), and it
        moves dlib's face descriptor away from the portrait (median distance +0.04 at half strength, +0.01 at 0.2),
        so only a fifth of it is mixed in by default.
        """
        x0, y0, x1, y1 = (int(v) for v in roi)
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ValueError(f"roi {roi} must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1, non-negative")
        if mask.shape != (y1 - y0, x1 - x0):
            raise ValueError(f"mask must be {(y1 - y0, x1 - x0)} (ROI height, width), got {mask.shape}")
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        if clahe_clip <= 0:
            raise ValueError(f"clahe_clip must be > 0, got {clahe_clip}")
        if not 0.0 <= clahe_strength <= 1.0:
            raise ValueError(f"clahe_strength must be in [0, 1], got {clahe_strength}")
        weight = np.ascontiguousarray(mask, dtype=np.float32)
        if not np.isfinite(weight).all() or weight.min() < 0.0 or weight.max() > 1.0:
            raise ValueError("mask values must be finite and in [0, 1]")
        self._slices = (slice(y0, y1), slice(x0, x1))
        self._weight = weight
        self._amount = float(amount)
        self._clahe_strength = float(clahe_strength)
        # 4x4 tiles on the half-size luma, the same tile size as OpenCV's default 8x8 at full size: about 24-64 px
        # tiles on 190-512 crops, local enough for a face. CLAHE is most of this enhancer's cost, and its change to
        # the luma is a smooth remap: worked out at half size and scaled up, it costs a quarter (the fine detail is
        # the unsharp mask's job).
        self._clahe = cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(4, 4))
        shape = weight.shape
        self._half = (max(1, shape[1] // 2), max(1, shape[0] // 2))
        self._luma = np.empty(shape, np.uint8)
        self._small = np.empty(self._half[::-1], np.uint8)
        self._small_equalised = np.empty(self._half[::-1], np.uint8)
        self._small_change = np.empty(self._half[::-1], np.float32)
        self._change = np.empty(shape, np.float32)
        self._blurred = np.empty(shape, np.uint8)
        self._delta = np.empty(shape, np.float32)
        self._zero = np.zeros(shape, np.float32)
        self._gain = np.empty(shape, np.uint8)
        self._loss = np.empty(shape, np.uint8)
        self._gain3 = np.empty((*shape, 3), np.uint8)
        self._loss3 = np.empty((*shape, 3), np.uint8)

    def enhance(self, frame: np.ndarray) -> None:
        """Enhance the ROI of `frame` (H, W, 3 uint8 BGR) in place; pixels where the mask is 0 stay unchanged."""
        region = frame[self._slices]
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or region.shape[:2] != self._weight.shape:
            raise ValueError(f"frame {frame.shape} {frame.dtype} does not hold this enhancer's ROI as uint8 BGR")
        cv2.cvtColor(region, cv2.COLOR_BGR2GRAY, dst=self._luma)
        # A 3x3 binomial blur (sigma ~0.85): sharpens pore-scale detail without haloing eyes and lips, at under half
        # the cost of a sigma-1 Gaussian. _delta holds the unsharp mask's change to the luma, plus CLAHE's (mixed in
        # at its strength), then that change faded by the mask.
        cv2.GaussianBlur(self._luma, (3, 3), sigmaX=0.0, dst=self._blurred)
        cv2.addWeighted(self._luma, self._amount, self._blurred, -self._amount, 0.0, dst=self._delta,
                        dtype=cv2.CV_32F)
        if self._clahe_strength > 0.0:
            cv2.resize(self._luma, self._half, dst=self._small, interpolation=cv2.INTER_AREA)
            self._clahe.apply(self._small, dst=self._small_equalised)
            cv2.subtract(self._small_equalised, self._small, dst=self._small_change, dtype=cv2.CV_32F)
            cv2.resize(self._small_change, self._change.shape[::-1], dst=self._change, interpolation=cv2.INTER_LINEAR)
            cv2.scaleAdd(self._change, self._clahe_strength, self._delta, dst=self._delta)
        cv2.multiply(self._delta, self._weight, dst=self._delta)
        # Adding a float image to uint8 takes OpenCV's slow mixed-type path; splitting the change into its rounded,
        # saturated positive and negative parts gives the same pixels with two plain uint8 passes (~30 % faster).
        cv2.add(self._delta, 0.0, dst=self._gain, dtype=cv2.CV_8U)
        cv2.subtract(self._zero, self._delta, dst=self._loss, dtype=cv2.CV_8U)
        cv2.cvtColor(self._gain, cv2.COLOR_GRAY2BGR, dst=self._gain3)
        cv2.cvtColor(self._loss, cv2.COLOR_GRAY2BGR, dst=self._loss3)
        cv2.add(region, self._gain3, dst=region)
        cv2.subtract(region, self._loss3, dst=region)

    def enhance_batch(self, frames: Sequence[np.ndarray], landmarks: Sequence[np.ndarray | None]) -> None:
        for frame in frames:
            self.enhance(frame)


def similarity(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity (rotation, uniform scale, shift; no reflection) taking `points` to `targets`."""
    points = np.asarray(points, np.float64)
    system = np.zeros((2 * len(points), 4))
    system[0::2] = np.column_stack([points[:, 0], -points[:, 1], np.ones(len(points)), np.zeros(len(points))])
    system[1::2] = np.column_stack([points[:, 1], points[:, 0], np.zeros(len(points)), np.ones(len(points))])
    cos, sin, shift_x, shift_y = np.linalg.lstsq(system, np.asarray(targets, np.float64).reshape(-1), rcond=None)[0]
    return np.array([[cos, -sin, shift_x], [sin, cos, shift_y]])


class FaceAligner:
    """A frame's face to the 512² template and back into the avatar's ROI, faded in by the face mask.

    Only the ROI is read back and written: the inverse warp lands directly in ROI pixels.
    """

    def __init__(self, roi: Roi, mask: np.ndarray, size: int = 512) -> None:
        x0, y0, x1, y1 = roi
        if mask.shape != (y1 - y0, x1 - x0):
            raise ValueError(f"mask must be {(y1 - y0, x1 - x0)} (ROI height, width), got {mask.shape}")
        self.roi = roi
        self.size = size
        self.template = TEMPLATE_512 * (size / 512)
        self._mask = np.ascontiguousarray(mask, np.float32)
        # The template square fades out over its outer 1/16: where the warped square ends inside the ROI (a face
        # larger than the template frame), the restored face blends in instead of showing the square's edge.
        ramp = np.clip((np.minimum(np.arange(size), size - 1 - np.arange(size)) + 0.5) / (size / 16), 0.0, 1.0)
        ramp = ramp * ramp * (3.0 - 2.0 * ramp)
        self._inside = np.outer(ramp, ramp).astype(np.float32)

    def affine(self, landmarks: np.ndarray) -> np.ndarray:
        """Frame pixels -> template pixels, from the 68 points the frame shows."""
        return similarity(five_points(landmarks), self.template)

    def to_template(self, frame: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """(size, size, 3) uint8 BGR: the face of `frame` where the template expects it."""
        return cv2.warpAffine(frame, affine, (self.size, self.size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)

    def paste_back(self, frame: np.ndarray, face: np.ndarray, affine: np.ndarray) -> None:
        """Warp `face` (template pixels) back into `frame`'s ROI, in place, weighted by the mask."""
        x0, y0, x1, y1 = self.roi
        back = cv2.invertAffineTransform(affine)
        back[:, 2] -= (x0, y0)
        size = (x1 - x0, y1 - y0)
        warped = cv2.warpAffine(face, back, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        # float32 like `_inside`: cv2's stubs say int or float, and numpy's will not multiply that in place.
        weight = cast(npt.NDArray[np.float32], cv2.warpAffine(self._inside, back, size, flags=cv2.INTER_LINEAR,
                                                             borderMode=cv2.BORDER_CONSTANT))
        weight *= self._mask
        region = frame[y0:y1, x0:x1]
        mixed = region.astype(np.float32)
        mixed += (warped.astype(np.float32) - mixed) * weight[:, :, None]
        np.rint(mixed, out=mixed)
        region[...] = mixed.astype(np.uint8)


class Restorer:
    """A loaded restoration network on its device and precision: 512² uint8 BGR faces in, restored faces out, in
    batches (halved on CUDA out-of-memory). Shared by every session of an avatar: it keeps no per-stream state."""

    def __init__(self, name: str, network: Any, placement: Placement, max_batch: int) -> None:
        self.name = name
        self.placement = placement
        self.network = network.to(device=placement.device, dtype=placement.dtype)
        self.batch = max_batch

    def forward(self, faces: Sequence[np.ndarray]) -> Any:
        """(B, 3, 512, 512) float tensor in [-1, 1], RGB: the network's output for these faces, in one batch."""
        import torch

        from stages.nets.restorers import restore

        pixels = torch.from_numpy(np.stack(faces)).to(self.placement.device)
        batch = pixels.flip(-1).permute(0, 3, 1, 2).to(self.placement.dtype).div_(127.5).sub_(1.0)
        with torch.inference_mode():
            return restore(self.network, batch.contiguous())

    def restore(self, faces: Sequence[np.ndarray]) -> list[np.ndarray]:
        from stream.device import map_in_batches

        def run(part: Sequence[np.ndarray]) -> list[np.ndarray]:
            import torch

            with torch.inference_mode():
                restored = self.forward(part).float().add_(1.0).mul_(127.5).round_().clamp_(0, 255)
                return list(restored.to(torch.uint8).permute(0, 2, 3, 1).flip(-1).cpu().numpy())

        return map_in_batches(run, faces, self.batch, self._smaller)

    def _smaller(self, batch: int) -> None:
        self.batch = batch

    def fit_to_gpu(self, notice: Callable[[str], None]) -> None:
        """On CUDA: fall back to float32 when half precision overflows these weights, and take the largest batch
        (up to the setting) that free memory holds, measured on two faces."""
        if not self.placement.is_cuda:
            return
        import torch

        from stream.device import Placement, batch_for_memory, free_memory_bytes

        grey = [np.full((512, 512, 3), 128, np.uint8)] * 2
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        if not bool(torch.isfinite(self.forward(grey)).all()) and self.placement.precision != "float32":
            notice(f"{self.name} overflows in {self.placement.precision} with these weights: running it in float32")
            self.placement = Placement(self.placement.device, "float32")
            self.network = self.network.float()
            torch.cuda.reset_peak_memory_stats()
            self.forward(grey)
        torch.cuda.synchronize()
        per_face = (torch.cuda.max_memory_allocated() - before) // 2
        self.batch = batch_for_memory(per_face, free_memory_bytes(self.placement), self.batch)


class NeuralEnhancer:
    """Restores the known face of each frame with a `Restorer`, a batch of frames at a time.

    `locate` finds the 68 points of a frame whose renderer did not report them (the SadTalker backend: dlib's
    predictor on the known face box, a few ms, no detection).
    """

    def __init__(self, restorer: Restorer, roi: Roi, mask: np.ndarray,
                 locate: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.restorer = restorer
        self.aligner = FaceAligner(roi, mask)
        self.locate = locate

    def enhance_batch(self, frames: Sequence[np.ndarray], landmarks: Sequence[np.ndarray | None]) -> None:
        if not frames:
            return
        affines = [self.aligner.affine(points if points is not None else self._located(frame))
                   for frame, points in zip(frames, landmarks, strict=True)]
        faces = [self.aligner.to_template(frame, affine) for frame, affine in zip(frames, affines)]
        for frame, face, affine in zip(frames, self.restorer.restore(faces), affines):
            self.aligner.paste_back(frame, face, affine)

    def _located(self, frame: np.ndarray) -> np.ndarray:
        if self.locate is None:
            raise ValueError("a frame came without landmarks and this enhancer has no way to find them")
        return self.locate(frame)


def make_enhancer(name: str, roi: Roi, mask: np.ndarray, *, restorer: Restorer | None = None,
                  locate: Callable[[np.ndarray], np.ndarray] | None = None, **options: Any) -> Enhancer | None:
    """The enhancer called `name` for one avatar's ROI and mask, or None for "none" (skip the stage).

    The neural ones need the avatar's loaded `restorer`; `options` go to the light enhancer (e.g. `amount=0.3`).
    """
    if name == "none":
        return None
    if name == "light":
        return LightEnhancer(roi, mask, **options)
    if name in NEURAL_ENHANCERS:
        if restorer is None or restorer.name != name:
            raise ValueError(f"the {name} enhancer needs its loaded network (prepare_restorer)")
        return NeuralEnhancer(restorer, roi, mask, locate)
    raise ValueError(f"unknown enhancer {name!r}; valid enhancers: {', '.join(ENHANCERS)}")


@dataclass(frozen=True, slots=True)
class EnhancerChoice:
    """What runs for a preset's wish on this install: the enhancer's name and, for a neural one, its weights."""

    name: str
    weights: Path | None = None


def resolve_enhancer(wish: str, checkpoints: str | Path | None, *, device: str, strict: bool,
                     notice: Callable[[str], None]) -> EnhancerChoice:
    """A preset's wish -> the enhancer to run, by the weights in `checkpoints` and the device.

    `auto` is light, or gfpgan on CUDA with its weights present (silently: a speed tier's choice); `best` is
    restoreformer, else gfpgan, else light, and an explicit name is that one, each fallback with a one-line notice,
    or an error when `strict`. torch is imported only to ask about CUDA when gfpgan's weights are there.
    """
    from stages.nets.restorers import find_restorer

    if wish not in WISHES:
        raise PresetError(f"unknown enhancer {wish!r}; valid: {', '.join(WISHES)}")
    if wish in ("none", "light"):
        return EnhancerChoice(wish)
    if wish == "auto":
        weights = find_restorer("gfpgan", checkpoints)
        if weights is not None and device != "cpu" and _cuda_available():
            return EnhancerChoice("gfpgan", weights)
        return EnhancerChoice("light")
    wanted = ["restoreformer", "gfpgan"] if wish == "best" else [wish]
    for position, name in enumerate(wanted):
        weights = find_restorer(name, checkpoints)
        if weights is None:
            continue
        if position:
            _fall_back(wanted[:position], name, checkpoints, strict, notice)
        return EnhancerChoice(name, weights)
    _fall_back(wanted, "light", checkpoints, strict, notice)
    return EnhancerChoice("light")


def _fall_back(missing: list[str], instead: str, checkpoints: str | Path | None, strict: bool,
               notice: Callable[[str], None]) -> None:
    from stages.nets.restorers import RESTORERS, missing_restorer_error

    if strict:
        raise missing_restorer_error(missing[0], checkpoints)
    files = " or ".join(RESTORERS[name].file for name in missing)
    where = f"in {checkpoints}" if checkpoints else "found (no --checkpoints DIR)"
    notice(f"{files} is not {where}: enhancing with {instead} instead")


def _cuda_available() -> bool:
    """Whether torch sees a CUDA GPU; on Linux without a GPU driver the answer is no without importing torch
    (4-7 s), so the embedded default stays torch-free on a CPU machine that holds the weights."""
    drivers = ("/proc/driver/nvidia/version", "/dev/kfd")  # NVIDIA's driver; AMD's, for ROCm builds of torch
    if sys.platform.startswith("linux") and not any(Path(driver).exists() for driver in drivers):
        return False
    try:
        import torch
    except ImportError:   # a GPU driver but no torch: the neural enhancers cannot run, light can
        return False
    return torch.cuda.is_available()


def prepare_restorer(choice: EnhancerChoice, *, device: str, max_batch: int, threads: int,
                  notice: Callable[[str], None]) -> Restorer | None:
    """The network of a neural choice on its device (fp16 on CUDA where the weights allow it, fp32 on the CPU,
    torch's CPU threads set deliberately); None for the others."""
    if choice.name not in NEURAL_ENHANCERS or choice.weights is None:
        return None
    from stages.nets.restorers import load_restorer
    from stream.device import Placement, choose_placement, set_cpu_threads

    placement = choose_placement(device)
    if placement.is_cuda:
        placement = Placement(placement.device, "float16")
    else:
        set_cpu_threads(threads)
        # Batches are for GPUs: on this project's CPU a GFPGAN face costs 4.8 s alone, 6.4 s in a batch of 4.
        max_batch = 1
    restorer = Restorer(choice.name, load_restorer(choice.name, choice.weights), placement, max_batch)
    restorer.fit_to_gpu(notice)
    return restorer

