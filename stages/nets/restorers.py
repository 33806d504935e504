"""Face restoration networks from the gfpgan package (GFPGANv1Clean, RestoreFormer) with the user's weight files.

The architectures are gfpgan's own; only loading is ours: the official files (`GFPGANv1.4.pth`, `RestoreFormer.pth`)
are read without running pickled code and loaded strictly. Both networks map a 512² aligned face in [-1, 1] (RGB) to
a restored one in the same range. Nothing here downloads anything: gfpgan's `GFPGANer` helper (which fetches
facexlib's detectors) is never built.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.nets.checkpoints import CheckpointError, load_strict, read_checkpoint

if TYPE_CHECKING:
    import torch

FACE_SIZE_PX = 512


@dataclass(frozen=True, slots=True)
class RestorerKind:
    name: str
    file: str
    description: str
    source: str  # where the official file comes from


RESTORERS = {
    "gfpgan": RestorerKind("gfpgan", "GFPGANv1.4.pth", "GFPGAN v1.4 (clean architecture)",
                           "SadTalker's scripts/download_models.sh puts GFPGANv1.4.pth in its ./gfpgan/weights/ "
                           "folder"),
    "restoreformer": RestorerKind("restoreformer", "RestoreFormer.pth", "RestoreFormer",
                                  "RestoreFormer.pth is among GFPGAN's v1.3.4 release files"),
}
DOWNLOAD_HINT = "; ".join(kind.source for kind in RESTORERS.values())


def find_restorer(name: str, directory: str | Path | None) -> Path | None:
    """The official file of restorer `name` in `directory`, its `gfpgan/weights/` folder, or the `gfpgan/weights/`
    beside it (SadTalker's layout when `directory` is its `checkpoints/`); None when it is not there."""
    if directory is None or str(directory) == "":
        return None
    root = Path(directory).expanduser()
    file = RESTORERS[name].file
    folders = [root, root / "gfpgan" / "weights", root.parent / "gfpgan" / "weights"]
    return next((folder / file for folder in folders if (folder / file).is_file()), None)


def import_architectures() -> tuple[type, type]:
    """gfpgan's GFPGANv1Clean and RestoreFormer classes.

    gfpgan imports basicsr, which imports `torchvision.transforms.functional_tensor`; torchvision ≥ 0.17 removed that
    module (its functions live on in `functional`), so it is aliased first. This is the one place that does it.
    """
    import torchvision.transforms.functional as functional

    sys.modules.setdefault("torchvision.transforms.functional_tensor", functional)
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean
    from gfpgan.archs.restoreformer_arch import RestoreFormer

    return GFPGANv1Clean, RestoreFormer


def build_restorer(name: str) -> torch.nn.Module:
    """The architecture of restorer `name`, as the official weights were trained (random weights)."""
    gfpgan_class, restoreformer_class = import_architectures()
    if name == "gfpgan":
        return gfpgan_class(out_size=FACE_SIZE_PX, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                            fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                            sft_half=True)
    if name == "restoreformer":
        # Its decoder prints a line while it is built: keep standard output clean for `-o -` video pipes.
        with contextlib.redirect_stdout(io.StringIO()):
            return restoreformer_class()
    raise ValueError(f"unknown restorer {name!r}; valid: {', '.join(RESTORERS)}")


def load_restorer(name: str, path: Path) -> torch.nn.Module:
    """Restorer `name` with the weights of `path` (fp32, CPU, eval), strictly: its `params_ema` (or `params`) state
    dict must hold exactly the network's tensors with their shapes."""
    content = read_checkpoint(path, hint=DOWNLOAD_HINT)
    entry = next((key for key in ("params_ema", "params") if isinstance(content.get(key), Mapping)), None)
    if entry is None:
        raise CheckpointError(f"{path.name}: no 'params_ema' or 'params' state dict in it (it has "
                              f"{', '.join(map(repr, content)) or 'nothing'}); {DOWNLOAD_HINT}")
    network = build_restorer(name)
    load_strict(network, content[entry], file=path.name, part=name, model=RESTORERS[name].description,
                hint=DOWNLOAD_HINT)
    return network


def restore(network: Any, faces: torch.Tensor) -> torch.Tensor:
    """(B, 3, 512, 512) RGB in [-1, 1] -> restored faces, same shape, clamped to [-1, 1].

    GFPGAN runs without noise injection (`randomize_noise=False`, its stored noise maps instead): fresh noise in
    every frame flickers, and a frame must not depend on what else is in its batch.
    """
    output = network(faces, return_rgb=False, randomize_noise=False)[0]
    return output.clamp_(-1.0, 1.0)


def missing_restorer_error(name: str, directory: str | Path | None) -> CheckpointError:
    """The enhancer asked for has no weights: name that one file and where it comes from, no other."""
    kind = RESTORERS[name]
    where = f"which is not in {directory}" if directory else "and no --checkpoints DIR was given"
    return CheckpointError(f"the {name} enhancer needs {kind.file}, {where} ({kind.source})")


def describe_restorers(directory: str | Path) -> list[tuple[str, bool, str, str]]:
    """(enhancer, usable, detail, fix) for each restorer whose file is in `directory`, each file loaded."""
    lines = []
    for name, kind in RESTORERS.items():
        path = find_restorer(name, directory)
        if path is None:
            lines.append((f"{name} enhancer", False, f"no {kind.file} in {directory}", DOWNLOAD_HINT))
            continue
        try:
            load_restorer(name, path)
        except CheckpointError as error:
            lines.append((f"{name} enhancer", False, str(error), DOWNLOAD_HINT))
            continue
        lines.append((f"{name} enhancer", True, f"{path}: loads ({path.stat().st_size / 2**20:.0f} MiB)", ""))
    return lines
