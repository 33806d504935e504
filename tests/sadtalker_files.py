"""Random-weight checkpoint files in SadTalker's official layouts, made from the key inventory, never from our modules.

The inventory (`tests/data/sadtalker/sadtalker-keys.txt`, copied from the spec) lists every tensor of the official
files by section. The weights follow the spec's generation rule (`sadtalker-ref.md`), so with them our networks must
reproduce upstream's outputs stored in `sadtalker_ref.npz`: a wrong key, prefix or shape in our networks fails.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data" / "sadtalker"
KEYS = DATA / "sadtalker-keys.txt"
REFERENCE = DATA / "sadtalker_ref.npz"

SECTION_SCALE = {"A": 1.0, "B": 0.25, "C": 1.0, "D": 1.0, "E": 1.0, "F": 0.5, "G": 0.5, "H": 1.0}
SAFETENSORS_SECTIONS = ("A", "B", "C", "D", "E")
# Where each section goes in the legacy files, without prefixes (section -> (file, entry)).
LEGACY_ENTRIES = {
    "A": ("facevid2vid_00189-model.pth.tar", "kp_detector"),
    "B": ("facevid2vid_00189-model.pth.tar", "generator"),
    "H": ("facevid2vid_00189-model.pth.tar", "he_estimator"),
    "C": ("auido2exp_00300-model.pth", "model"),
    "D": ("auido2pose_00140-model.pth", "model"),
    "E": ("epoch_20.pth", "net_recon"),
}
PREFIXES = {"A": "kp_extractor.", "B": "generator.", "C": "audio2exp.", "D": "audio2pose.", "E": "face_3drecon."}

Entry = tuple[str, tuple[int, ...], str]


def inventory() -> dict[str, list[Entry]]:
    """Section letter -> [(key, shape, dtype)] in the file's order."""
    sections: dict[str, list[Entry]] = {}
    current: list[Entry] | None = None
    for line in KEYS.read_text().splitlines():
        if heading := re.match(r"### ([A-Z])\.", line):
            current = sections.setdefault(heading.group(1), [])
        elif line.strip() and not line.startswith("#") and current is not None:
            key, shape, dtype = line.split("\t")
            current.append((key, tuple(int(n) for n in re.findall(r"\d+", shape)), dtype))
    return sections


def _draw(rng: np.random.Generator, key: str, shape: tuple[int, ...], dtype: str, scale: float) -> np.ndarray:
    if dtype == "int64":
        return np.zeros(shape, np.int64)
    if key.endswith("running_var"):
        return np.ones(shape, np.float32)
    # "ending bias" means the last name part: audio2pose's (46, 64) `classbias` tables are drawn like any matrix.
    if key.rsplit(".", 1)[-1] in ("running_mean", "bias") or not shape:
        return np.zeros(shape, np.float32)
    if len(shape) == 1:
        if key.endswith(("weight_u", "weight_v")):
            vector = rng.standard_normal(shape)
            return (vector / np.linalg.norm(vector)).astype(np.float32)
        return np.ones(shape, np.float32)
    fan_in = math.prod(shape[1:])
    return (scale * rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)


@functools.cache
def random_sections(sections: str = "ABCDEFG") -> dict[str, dict[str, np.ndarray]]:
    """The spec's random weights, drawn from one rng in the inventory's order (keys as listed, prefixes kept).

    Cached for the test session (drawing takes seconds): copy before changing anything."""
    rng = np.random.default_rng(0)
    drawn: dict[str, dict[str, np.ndarray]] = {}
    for letter, entries in inventory().items():
        if letter > max(sections):
            break
        drawn[letter] = {key: _draw(rng, key, shape, dtype, SECTION_SCALE[letter]) for key, shape, dtype in entries}
    return {letter: tensors for letter, tensors in drawn.items() if letter in sections}


def weights_checksum(safetensors_state: dict[str, np.ndarray]) -> np.ndarray:
    """The spec's check that the weights match upstream's: |w| summed for the first 50 keys in sorted order."""
    return np.array([np.abs(safetensors_state[key]).sum(dtype=np.float64) for key in sorted(safetensors_state)[:50]])


def unprefixed(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key.removeprefix(prefix): value for key, value in tensors.items()}


def _torch_state(tensors: dict[str, np.ndarray]) -> dict:
    import torch

    return {key: torch.from_numpy(np.array(value)) for key, value in tensors.items()}  # 0-d stays 0-d


def write_official_files(directory: Path, size: int = 256, *, legacy: bool = False) -> Path:
    """The checkpoint directory a SadTalker user has: the safetensors file and both mapping files
    (`legacy=True`: the old per-network .pth files instead of the safetensors one)."""
    import torch
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    sections = random_sections("ABCDEFGH" if legacy else "ABCDEFG")
    if legacy:
        files: dict[str, dict] = {}
        for letter, (name, entry) in LEGACY_ENTRIES.items():
            files.setdefault(name, {"epoch": 1})[entry] = _torch_state(
                unprefixed(sections[letter], PREFIXES.get(letter, "")))
        for name, content in files.items():
            torch.save(content, directory / name)
    else:
        flat = {key: value for letter in SAFETENSORS_SECTIONS for key, value in sections[letter].items()}
        save_file(flat, str(directory / f"SadTalker_V0.0.2_{size}.safetensors"))
    torch.save({"mapping": _torch_state(sections["F"]), "epoch": 229}, directory / "mapping_00229-model.pth.tar")
    torch.save({"mapping": _torch_state(sections["G"]), "epoch": 109}, directory / "mapping_00109-model.pth.tar")
    return directory
