"""SadTalker's official checkpoint files -> our networks, strictly, without executing pickled code.

Which file feeds which network (spec §2.1):
- `SadTalker_V0.0.2_{256,512}.safetensors`: five prefixed state dicts (`kp_extractor.`, `generator.`, `audio2exp.`,
  `audio2pose.`, `face_3drecon.`), selected as upstream does: a key belongs to a prefix when the prefix occurs in it,
  and `prefix.` is removed.
- `mapping_00229-model.pth.tar` (crop, extcrop, resize; 70 inputs) / `mapping_00109-model.pth.tar` (full, extfull; 73),
  entry `mapping`.
- Legacy files, used when no safetensors file is there (256 only): `facevid2vid_00189-model.pth.tar` (`kp_detector`,
  `generator`), `auido2exp_00300-model.pth` and `auido2pose_00140-model.pth` (`model`), `epoch_20.pth` (`net_recon`).
Strict: every tensor a network needs is present with its shape, and every other tensor belongs to a part we never run
at inference (audio2pose's CVAE encoder and discriminator); anything else names the file and what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream.errors import InputError, first_line

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger("talkstream.checkpoints")

SIZES = (256, 512)
FULL_CROP_MODES = ("full", "extfull")  # these paste back into the portrait and use the 73-input mapping net
DOWNLOAD_HINT = "SadTalker's scripts/download_models.sh puts it in its ./checkpoints/ folder"
# Tensors the official files hold for parts that inference never runs (spec §1.5, §1.8): accepted, never loaded.
UNUSED_PARTS = {"audio2pose": ("netG.encoder.", "netD_motion.")}
MAPPING_FILES = {70: "mapping_00229-model.pth.tar", 73: "mapping_00109-model.pth.tar"}
LEGACY_FILES = {  # part -> (file, entry)
    "kp_extractor": ("facevid2vid_00189-model.pth.tar", "kp_detector"),
    "generator": ("facevid2vid_00189-model.pth.tar", "generator"),
    "audio2exp": ("auido2exp_00300-model.pth", "model"),
    "audio2pose": ("auido2pose_00140-model.pth", "model"),
    "face_3drecon": ("epoch_20.pth", "net_recon"),
}
PARTS = tuple(LEGACY_FILES)


class CheckpointError(InputError):
    """A checkpoint file is missing, unreadable or does not match the networks (a user's mistake: exit 2)."""


def safetensors_name(size: int) -> str:
    return f"SadTalker_V0.0.2_{size}.safetensors"


def mapping_inputs(crop_mode: str) -> int:
    """The full modes feed the three crop parameters to the mapping net as well (spec §1.0)."""
    return 73 if crop_mode in FULL_CROP_MODES else 70


@dataclass(frozen=True, slots=True)
class CheckpointFiles:
    """The files one configuration reads: the safetensors file, or the legacy files, and one mapping file."""

    directory: Path
    size: int
    bundle: Path | None               # the safetensors file; None: legacy files
    legacy: dict[str, Path]           # part -> legacy file (empty with a bundle)
    mapping: Path
    mapping_inputs: int

    @property
    def paths(self) -> list[Path]:
        return sorted({*([self.bundle] if self.bundle else []), *self.legacy.values(), self.mapping})


def find_checkpoints(directory: str | Path, size: int = 256, crop_mode: str = "crop") -> CheckpointFiles:
    """Locate the official files by name in `directory` (also its `checkpoints/` subfolder, SadTalker's own layout)."""
    if size not in SIZES:
        raise CheckpointError(f"SadTalker renders at {' or '.join(map(str, SIZES))} px, not {size}")
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    folders = [root, root / "checkpoints"]

    def find(name: str) -> Path | None:
        return next((folder / name for folder in folders if (folder / name).is_file()), None)

    inputs = mapping_inputs(crop_mode)
    mapping = find(MAPPING_FILES[inputs])
    if mapping is None:
        raise CheckpointError(f"{MAPPING_FILES[inputs]} (the mapping net of crop mode {crop_mode!r}) is not in "
                              f"{root}; {DOWNLOAD_HINT}")
    if bundle := find(safetensors_name(size)):
        return CheckpointFiles(root, size, bundle, {}, mapping, inputs)
    legacy = {part: find(name) for part, (name, _) in LEGACY_FILES.items()}
    if size == 256 and all(legacy.values()):
        return CheckpointFiles(root, size, None, {part: path for part, path in legacy.items() if path}, mapping,
                               inputs)
    missing = safetensors_name(size) + ("" if size != 256 else " (or the legacy .pth files)")
    raise CheckpointError(f"{missing} is not in {root}; {DOWNLOAD_HINT}")


def read_safetensors(path: Path, prefixes: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """prefix -> its tensors with `prefix.` removed; a key under no prefix is an error, as is a truncated file."""
    from safetensors import SafetensorError, safe_open

    prefixes = tuple(prefixes)
    parts: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    try:
        with safe_open(str(path), framework="pt") as bundle:
            strays = []
            for key in bundle.keys():  # noqa: SIM118 - safe_open is not a mapping
                owner = next((prefix for prefix in prefixes if prefix in key), None)
                if owner is None:
                    strays.append(key)
                    continue
                parts[owner][key.replace(f"{owner}.", "")] = bundle.get_tensor(key)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path.name}: cannot be read as safetensors ({first_line(error)[:160]}): truncated or "
                              f"damaged; {DOWNLOAD_HINT}") from None
    if strays:
        raise CheckpointError(f"{path.name}: {len(strays)} tensors belong to no SadTalker network "
                              f"({_listed(strays)}); is this SadTalker's file?")
    return parts


def read_checkpoint(path: Path, *, hint: str = DOWNLOAD_HINT) -> Mapping[str, Any]:
    """A torch checkpoint's top-level dict, read with `weights_only` (no pickled code runs)."""
    import pickle

    import torch

    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path.name}: cannot be read as a torch checkpoint ({first_line(error)[:160]}): "
                              f"truncated, damaged or holding more than weights; {hint}") from None
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path.name}: holds a {type(content).__name__}, not a checkpoint dict")
    return content


def read_pickled(path: Path, entries: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The named state dicts of a torch checkpoint; other top-level entries (optimiser state, epoch) are ignored."""
    content = read_checkpoint(path)
    entries = tuple(entries)
    absent = [entry for entry in entries if not isinstance(content.get(entry), Mapping)]
    if absent:
        raise CheckpointError(f"{path.name}: no {', '.join(map(repr, absent))} state dict in it (it has "
                              f"{', '.join(map(repr, content)) or 'nothing'}); {DOWNLOAD_HINT}")
    ignored = [key for key in content if key not in entries]
    if ignored:
        LOG.debug("%s: ignoring entries %s", path.name, ", ".join(map(str, ignored)))
    return {entry: dict(content[entry]) for entry in entries}


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, file: str, part: str,
                unused: tuple[str, ...] = (), model: str = "SadTalker's network", hint: str = DOWNLOAD_HINT) -> None:
    """Load `state` into `module` when every tensor it needs is there with its shape and nothing is left unexplained."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = [key for key in expected if key not in state]
    wrong = [f"{key} {tuple(state[key].shape)} instead of {expected[key]}"
             for key in expected if key in state and tuple(state[key].shape) != expected[key]]
    unknown = [key for key in state if key not in expected and not key.startswith(unused)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors ({_listed(missing)})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape ({_listed(wrong)})")
    if unknown:
        problems.append(f"{len(unknown)} unknown tensors ({_listed(unknown)})")
    if problems:
        raise CheckpointError(f"{file}: {part} does not match {model}: {'; '.join(problems)}; "
                              f"get the official file ({hint})")
    module.load_state_dict({key: state[key] for key in expected}, strict=True)
    module.eval()


@dataclass(frozen=True, slots=True)
class SadTalkerNetworks:
    """Every network inference runs, loaded, in eval mode, fp32 on the CPU."""

    files: CheckpointFiles
    kp_extractor: Any
    generator: Any
    audio2exp: Any
    audio2pose: Any
    face_3drecon: Any
    mapping: Any


def _builders(mapping_inputs: int) -> dict[str, Callable[[], Any]]:
    from stages.nets.audio2coeff import Audio2Exp, PoseGenerator
    from stages.nets.face3d import ReconNet
    from stages.nets.facevid2vid import KPDetector, OcclusionAwareSPADEGenerator
    from stages.nets.mapping import MappingNet

    return {
        "kp_extractor": KPDetector,
        "generator": OcclusionAwareSPADEGenerator,
        "audio2exp": Audio2Exp,
        "audio2pose": PoseGenerator,
        "face_3drecon": ReconNet,
        "mapping": lambda: MappingNet(mapping_inputs),
    }


def load_sadtalker_networks(files: CheckpointFiles) -> SadTalkerNetworks:
    """Build every network and fill it from the user's files (fp32, CPU; the caller moves them to a device)."""
    networks = {part: build() for part, build in _builders(files.mapping_inputs).items()}
    if files.bundle is not None:
        states = read_safetensors(files.bundle, PARTS)
        for part in PARTS:
            load_strict(networks[part], states[part], file=files.bundle.name, part=part,
                        unused=UNUSED_PARTS.get(part, ()))
    else:
        for part, path in files.legacy.items():
            entry = LEGACY_FILES[part][1]
            state = read_pickled(path, [entry])[entry]
            load_strict(networks[part], state, file=path.name, part=part, unused=UNUSED_PARTS.get(part, ()))
    mapping = read_pickled(files.mapping, ["mapping"])["mapping"]
    load_strict(networks["mapping"], mapping, file=files.mapping.name, part="mapping")
    return SadTalkerNetworks(files, **networks)


def _listed(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f", … {len(items) - shown} more" if len(items) > shown else "")


def describe_sadtalker_files(directory: str | Path) -> list[tuple[str, bool, str, str]]:
    """What a checkpoint folder holds for SadTalker, each file loaded into the networks it feeds:
    (file, usable, detail, fix) per file found, and one line for what is missing."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        return [("checkpoints", False, f"{root} is not a directory", "pass the folder holding SadTalker's files")]
    lines: list[tuple[str, bool, str, str]] = []
    for size in SIZES:
        for inputs, crop_mode in ((70, "crop"), (73, "full")):
            try:
                files = find_checkpoints(root, size, crop_mode)
                load_sadtalker_networks(files)
            except CheckpointError as error:
                if "is not in" not in str(error):
                    lines.append((f"sadtalker {size} px, {inputs}-input mapping", False, str(error), DOWNLOAD_HINT))
                continue
            used = ", ".join(path.name for path in files.paths)
            megabytes = sum(path.stat().st_size for path in files.paths) / 2**20
            modes = "full, extfull" if inputs == 73 else "crop, extcrop, resize"
            lines.append((f"sadtalker {size} px ({modes})", True, f"{used}: every network loads ({megabytes:.0f} "
                          "MiB)", ""))
    if not any(ok for _, ok, _, _ in lines):
        lines.append(("sadtalker checkpoints", False, f"no usable set in {root}", DOWNLOAD_HINT))
    return lines
