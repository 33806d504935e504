"""`presets.toml` -> frozen, validated dataclasses, with `--set section.key=value` overrides.

Unknown sections, keys and bad values are errors that name the valid choices.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

from stream.errors import PresetError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

PRESETS_FILE = Path(__file__).resolve().parent.parent / "presets.toml"
DEFAULT_PRESET = "balanced"  # when none is named: `render` and the library (`serve` has its own, for live sessions)

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
X264_TUNES = ("zerolatency", "film", "animation", "grain", "stillimage", "fastdecode")


@dataclass(frozen=True, slots=True)
class VideoSettings:
    fps: int
    max_side_px: int

    @property
    def frame_rate(self) -> Fraction:
        return Fraction(self.fps)


@dataclass(frozen=True, slots=True)
class StreamSettings:
    chunk_ms: int
    queue_depth: int


@dataclass(frozen=True, slots=True)
class MotionSettings:
    lookahead_ms: int
    head_scale: float


@dataclass(frozen=True, slots=True)
class RenderSettings:
    crop_size: int
    max_batch: int
    max_wait_ms: float


@dataclass(frozen=True, slots=True)
class BlendSettings:
    mode: str


@dataclass(frozen=True, slots=True)
class EnhanceSettings:
    enhancer: str
    device: str
    max_batch: int
    threads: int


@dataclass(frozen=True, slots=True)
class EncodeSettings:
    video_codec: str
    x264_preset: str
    x264_tune: str
    crf: int
    gop_frames: int
    audio_codec: str
    aac_coder: str
    audio_bitrate_kbps: int


# Value checks beyond the type: (section, key) -> (predicate, what a valid value is).
_CHECKS: dict[tuple[str, str], tuple[Any, str]] = {
    ("video", "fps"): (lambda v: 1 <= v <= 120, "an integer from 1 to 120"),
    ("video", "max_side_px"): (lambda v: 64 <= v <= 8192, "an integer from 64 to 8192"),
    ("stream", "chunk_ms"): (lambda v: v in (10, 20, 40), "10, 20 or 40"),
    ("stream", "queue_depth"): (lambda v: 1 <= v <= 256, "an integer from 1 to 256"),
    ("motion", "lookahead_ms"): (lambda v: 20 <= v <= 200, "an integer from 20 to 200"),
    ("motion", "head_scale"): (lambda v: 0 <= v <= 3, "a number from 0 to 3"),
    ("render", "crop_size"): (lambda v: 64 <= v <= 1024, "an integer from 64 to 1024"),
    ("render", "max_batch"): (lambda v: 1 <= v <= 64, "an integer from 1 to 64"),
    ("render", "max_wait_ms"): (lambda v: 0 <= v <= 1000, "a number of ms from 0 to 1000"),
    ("enhance", "device"): (lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    ("enhance", "max_batch"): (lambda v: 1 <= v <= 64, "an integer from 1 to 64"),
    ("enhance", "threads"): (lambda v: 0 <= v <= 256, "an integer from 0 to 256"),
    ("encode", "video_codec"): (lambda v: v in ("libx264",), "libx264"),
    ("encode", "x264_preset"): (lambda v: v in X264_PRESETS, "one of " + ", ".join(X264_PRESETS)),
    ("encode", "x264_tune"): (lambda v: v in X264_TUNES, "one of " + ", ".join(X264_TUNES)),
    ("encode", "crf"): (lambda v: 0 <= v <= 51, "an integer from 0 to 51"),
    ("encode", "gop_frames"): (lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    ("encode", "audio_codec"): (lambda v: v in ("aac",), "aac"),
    ("encode", "aac_coder"): (lambda v: v in ("fast", "twoloop"), "fast or twoloop"),
    ("encode", "audio_bitrate_kbps"): (lambda v: 16 <= v <= 512, "an integer from 16 to 512"),
}


@dataclass(frozen=True, slots=True)
class Preset:
    """One speed tier, fully resolved."""

    name: str
    description: str
    video: VideoSettings
    stream: StreamSettings
    motion: MotionSettings
    render: RenderSettings
    blend: BlendSettings
    enhance: EnhanceSettings
    encode: EncodeSettings

    def value(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)


SECTIONS: dict[str, type] = {
    "video": VideoSettings,
    "stream": StreamSettings,
    "motion": MotionSettings,
    "render": RenderSettings,
    "blend": BlendSettings,
    "enhance": EnhanceSettings,
    "encode": EncodeSettings,
}

S = TypeVar("S", bound="DataclassInstance")


def build_section(cls: type[S], table: Mapping[str, Any], where: str, checks: Mapping[str, Any] = {}) -> S:
    """A frozen dataclass from a TOML table: every field present, nothing unknown, each value of its type."""
    hints = get_type_hints(cls)
    names = [field.name for field in fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise PresetError(f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(names)}")
    missing = [name for name in names if name not in table]
    if missing:
        raise PresetError(f"{where} is missing {', '.join(missing)}")
    values = {}
    for name in names:
        values[name] = _typed(table[name], hints[name], f"{where}.{name}")
        check = checks.get(name)
        if check is not None and not check[0](values[name]):
            raise PresetError(f"bad value {table[name]!r} for {where}.{name}; expected {check[1]}")
    return cls(**values)


def _typed(value: Any, kind: Any, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise PresetError(f"bad value {value!r} for {where}; expected {_kind_name(kind)}")
    return value


def _kind_name(kind: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))


def parse_value(text: str) -> Any:
    """A `--set` value as TOML reads it (numbers, true/false, quoted or bare strings)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


class PresetBook:
    """All presets and backend sections of one `presets.toml`."""

    def __init__(self, path: Path = PRESETS_FILE) -> None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise PresetError(f"cannot read presets from {path}: {error}") from error
        self.path = path
        self._defaults: dict[str, Any] = data.get("defaults", {})
        self._presets: dict[str, dict[str, Any]] = data.get("presets", {})
        self.backends: dict[str, dict[str, Any]] = data.get("backends", {})

    @property
    def names(self) -> list[str]:
        return list(self._presets)

    def description(self, name: str) -> str:
        return str(self._presets[name].get("description", ""))

    def get(self, name: str, overrides: Iterable[str] = ()) -> tuple[Preset, dict[str, dict[str, Any]]]:
        """The preset `name` with `--set` overrides applied, and the backend tables with theirs.

        A preset may tune a backend's knobs (`[presets.NAME.backends.BACKEND]`); overrides of a backend knob are
        written `BACKEND.key=value` (e.g. `embedded.seed=3`).
        """
        if name not in self._presets:
            raise PresetError(f"unknown preset {name!r}; valid presets: {', '.join(self.names)}")
        merged = _merge(self._defaults, self._presets[name])
        backends = {backend: dict(table) for backend, table in self.backends.items()}
        for backend, table in merged.pop("backends", {}).items():
            if backend not in backends:
                raise PresetError(f"preset {name} tunes unknown backend {backend!r}; valid: {', '.join(backends)}")
            unknown = sorted(set(table) - set(backends[backend]))
            if unknown:
                raise PresetError(f"preset {name} sets unknown key {backend}.{unknown[0]}; "
                                  f"valid keys: {', '.join(backends[backend])}")
            backends[backend].update(table)
        for override in overrides:
            key, sep, text = override.partition("=")
            section, dot, field = key.strip().partition(".")
            if not sep or not dot or not field:
                raise PresetError(f"bad --set {override!r}; expected section.key=value, e.g. blend.mode=feather")
            if section in backends:
                if field not in backends[section]:
                    raise PresetError(
                        f"unknown key {section}.{field}; valid keys: {', '.join(backends[section])}")
                backends[section][field] = parse_value(text.strip())
                continue
            if section not in SECTIONS:
                valid = ", ".join([*SECTIONS, *backends])
                raise PresetError(f"unknown section {section!r} in --set {override!r}; valid sections: {valid}")
            merged.setdefault(section, {})[field] = parse_value(text.strip())
        return build_preset(name, merged), backends


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = {key: dict(value) if isinstance(value, Mapping) else value for key, value in base.items()}
    for key, value in top.items():
        if isinstance(value, Mapping):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    return merged


def build_preset(name: str, table: Mapping[str, Any]) -> Preset:
    unknown = sorted(set(table) - set(SECTIONS) - {"description"})
    if unknown:
        raise PresetError(f"unknown section {unknown[0]!r} in preset {name}; valid sections: {', '.join(SECTIONS)}")
    sections: dict[str, Any] = {}  # one settings class per section, as Preset's fields take them
    for section, cls in SECTIONS.items():
        checks = {key: check for (where, key), check in _CHECKS.items() if where == section}
        sections[section] = build_section(cls, table.get(section, {}), section, checks)
    return Preset(name=name, description=str(table.get("description", "")), **sections)


def check_choice(preset: Preset, dotted: str, choices: tuple[str, ...]) -> None:
    """Values whose choices belong to the stages (blend modes, enhancers) are checked by them, with this message."""
    if preset.value(dotted) not in choices:
        raise PresetError(f"bad value {preset.value(dotted)!r} for {dotted}; expected one of {', '.join(choices)}")


def check_fixed(preset: Preset, fixed: Mapping[str, Any], backend: str) -> None:
    """A backend fixes some values (e.g. SadTalker's 25 fps): refuse a preset that sets them otherwise."""
    for dotted, required in fixed.items():
        if preset.value(dotted) != required:
            raise PresetError(
                f"the {backend} backend fixes {dotted} = {required}; preset {preset.name} sets {preset.value(dotted)}")

