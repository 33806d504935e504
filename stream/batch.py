"""`talkstream batch`: many renders from a manifest, in parallel, resumable (the runtime's side: it knows no faces).

A manifest is a CSV file or JSON lines with `portrait`, `audio`, `output` and optionally `preset` and any preset key
(`blend.mode`, `sadtalker.pose_style`, ...); relative paths are the manifest folder's. Each job is rendered by a
function the caller gives (`run_job`, a module-level function of the stages, so that worker processes and Ray
workers import it by name): it takes a job's dictionary and returns its result's. Failures stay with their job;
outputs already complete are skipped; on Ctrl-C the finished outputs stay and none is left half-written (the
renderer writes each to a temporary file and renames it when complete).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from stream.errors import InputError, first_line

REQUIRED = ("portrait", "audio", "output")
STOPPED_STATUS = 128 + signal.SIGTERM
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus")


class ManifestError(InputError):
    """A manifest that cannot be run as it is: exit status 2, the line named."""


@dataclass(frozen=True)
class Job:
    """One render: where it came from (the manifest's line, for messages), its files and its preset."""

    line: int
    portrait: str
    audio: str
    output: str
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    format: str = "mp4"   # the output's container, from its name

    @property
    def name(self) -> str:
        return Path(self.output).name


@dataclass
class Result:
    """How a job ended: "done", "failed" or "skipped" (its output was already complete)."""

    line: int
    output: str
    status: str
    seconds: float = 0.0
    frames: int = 0
    error: str | None = None
    prepare_s: float = 0.0   # of `seconds`, preparing the avatar (0 where the worker had it)


# ------------------------------------------------------------------------------------------------ the jobs

def read_manifest(path: Path) -> list[Job]:
    """The jobs of a CSV or JSON-lines manifest, checked: every column there, every input readable, no output
    written twice. Raises ManifestError naming the line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read the manifest {path}: {getattr(error, 'strerror', None) or error}") from None
    rows = list(_json_rows(path, text) if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else
                _csv_rows(path, text))
    if not rows:
        raise ManifestError(f"{path} has no jobs")
    return check_jobs([_job(path, line, row) for line, row in rows], path)


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(text.splitlines())
    columns = [name.strip() for name in reader.fieldnames or []]
    for required in REQUIRED:
        if required not in columns:
            raise ManifestError(f"{path} line 1: no {required!r} column (its columns: {', '.join(columns) or 'none'})")
    for row in reader:
        if any((value or "").strip() for value in row.values()):
            yield reader.line_num, {key.strip(): (value or "").strip() for key, value in row.items() if key}


def _json_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, str]]]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path} line {line}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{path} line {line}: a JSON object per line expected")
        for required in REQUIRED:
            if not row.get(required):
                raise ManifestError(f"{path} line {line}: no {required!r}")
        yield line, {str(key): str(value) for key, value in row.items() if value is not None}


def _job(manifest: Path, line: int, row: dict[str, str]) -> Job:
    where = f"{manifest} line {line}"
    for required in REQUIRED:
        if not row.get(required):
            raise ManifestError(f"{where}: no {required}")
    folder = manifest.parent
    overrides = []
    for key, value in row.items():
        if key in (*REQUIRED, "preset") or value == "":
            continue
        if "." not in key:
            raise ManifestError(f"{where}: unknown column {key!r} (portrait, audio, output, preset, or a preset key "
                                "such as blend.mode)")
        overrides.append(f"{key}={value}")
    return Job(line, str(folder / row["portrait"]), str(folder / row["audio"]), str(folder / row["output"]),
               row.get("preset") or None, tuple(overrides))


def check_jobs(jobs: list[Job], source: Path | str) -> list[Job]:
    """Every input readable and every output written by one job only (ManifestError otherwise)."""
    writers: dict[str, Job] = {}
    for job in jobs:
        where = f"{source} line {job.line}"
        for kind, name in (("portrait", job.portrait), ("audio", job.audio)):
            if not os.path.isfile(name) or not os.access(name, os.R_OK):
                reason = "no such file" if not os.path.exists(name) else "not a readable file"
                raise ManifestError(f"{where}: cannot read the {kind} {name}: {reason}")
        output = os.path.realpath(job.output)
        if output in writers:
            raise ManifestError(f"{where}: writes {job.output}, as line {writers[output].line} does")
        writers[output] = job
    return jobs


def pair_jobs(portraits: Path, audio: Path, out_dir: Path, *, by_name: bool) -> list[Job]:
    """Every portrait with every speech (`out/PORTRAIT-SPEECH.mp4`), or, `by_name`, each portrait with the speech
    of the same name (`out/NAME.mp4`)."""
    faces = _files(portraits, IMAGE_SUFFIXES, "portraits")
    voices = _files(audio, AUDIO_SUFFIXES, "audio")
    if by_name:
        speech = {path.stem: path for path in voices}
        pairs = [(face, speech[face.stem], out_dir / f"{face.stem}.mp4") for face in faces if face.stem in speech]
        if not pairs:
            raise ManifestError(f"no portrait in {portraits} has a speech of the same name in {audio}")
    else:
        pairs = [(face, voice, out_dir / f"{face.stem}-{voice.stem}.mp4") for face in faces for voice in voices]
    return check_jobs([Job(number, str(face), str(voice), str(output))
                       for number, (face, voice, output) in enumerate(pairs, 1)], "pair")


def _files(folder: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    if not folder.is_dir():
        raise ManifestError(f"--{what} {folder} is not a folder")
    found = sorted(path for path in folder.iterdir() if path.suffix.lower() in suffixes and path.is_file())
    if not found:
        raise ManifestError(f"no {what} files in {folder} ({', '.join(suffixes)})")
    return found


def output_complete(path: str) -> bool:
    """An output a run can keep: a file that PyAV opens, whose container says how long it is and has video."""
    import av

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    try:
        with av.open(path) as container:
            return bool(container.streams.video) and (container.duration or 0) > 0
    except (av.error.FFmpegError, OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ running them

RunJob = Callable[[dict[str, Any]], dict[str, Any]]


def run_batch(jobs: list[Job], run_job: RunJob, *, workers: int, ray: str | None, ship_inputs: bool,
              force: bool, gpu: bool, progress: Progress, common: dict[str, Any],
              discard_partial: Callable[[str], None]) -> list[Result]:
    """Every job, skipping complete outputs unless `force`: on `workers` processes of this machine, or as Ray tasks
    (`ray`: "local", "auto" or ray://HOST:PORT) asking for a CPU each, or a GPU (`gpu`, where the cluster has any).
    `common`: what every job's dictionary carries besides its own fields (backend, checkpoints, the command line's
    preset and keys). Stopped early, the renders under way are stopped and `discard_partial(output)` removes whatever
    a worker killed mid-write left."""
    results: list[Result] = []
    todo = []
    for job in jobs:
        if not force and output_complete(job.output):
            results.append(Result(job.line, job.output, "skipped"))
            progress.finished(results[-1])
        else:
            todo.append(job)
    # Several renders at a time: each on one thread of stages (a core each), rather than two half-used.
    common = {**common, "side_by_side": ray is not None or workers > 1}
    specs = [_spec(job, common, ship_inputs) for job in todo]
    if not todo:
        return results
    run = _run_on_ray(ray, gpu) if ray is not None else _run_on_processes(workers)
    ended: set[str] = set()
    try:
        for job, outcome in run(run_job, list(zip(todo, specs))):
            ended.add(job.output)
            results.append(Result(job.line, job.output, **outcome))
            progress.finished(results[-1])
    finally:
        for job in todo:
            if job.output not in ended:
                discard_partial(job.output)
    return sorted(results, key=lambda result: result.line)


def _spec(job: Job, common: dict[str, Any], ship_inputs: bool) -> dict[str, Any]:
    spec = {**common, **asdict(job), "overrides": [*common.get("overrides", ()), *job.overrides]}
    spec["preset"] = job.preset or common.get("preset")
    if ship_inputs:   # the bytes travel with the job (Ray's object store), for nodes that cannot see the paths
        spec["portrait_bytes"] = Path(job.portrait).read_bytes()
        spec["audio_bytes"] = Path(job.audio).read_bytes()
    return spec


Pairs = list[tuple[Job, dict[str, Any]]]


def _run_on_processes(workers: int) -> Callable[[RunJob, Pairs], Iterator[tuple[Job, dict[str, Any]]]]:
    def run(run_job: RunJob, pairs: Pairs) -> Iterator[tuple[Job, dict[str, Any]]]:
        import multiprocessing

        # fork where there is one: a worker starts in milliseconds with what the parent imported (it has started no
        # thread or loop by then); spawn elsewhere.
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = ProcessPoolExecutor(max(1, min(workers, len(pairs))), mp_context=context, initializer=_worker_setup)
        pending: dict[Future[dict[str, Any]], Job] = {pool.submit(_in_worker, run_job, spec): job
                                                      for job, spec in pairs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    yield job, _outcome(future)
        finally:
            if pending:
                _stop_pool(pool)
            pool.shutdown()

    return run


def _outcome(future: Future[dict[str, Any]]) -> dict[str, Any]:
    try:
        return future.result()
    except Exception as error:   # noqa: BLE001 - a worker that died: that job failed, the others go on
        return {"status": "failed", "error": f"its worker stopped ({type(error).__name__}: {error})"}


_rendering = False   # in a worker: a job is running


def _worker_setup() -> None:
    """In each worker: Ctrl-C is the parent's to handle (it stops the workers); SIGTERM unwinds a render that is
    running (its temporary output removed) and ends an idle worker at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _unwind)


def _in_worker(run_job: RunJob, spec: dict[str, Any]) -> dict[str, Any]:
    global _rendering
    _rendering = True
    try:
        return run_job(spec)
    except KeyboardInterrupt:   # stopped by the parent: the render has unwound; the worker ends quietly
        os._exit(STOPPED_STATUS)
    finally:
        _rendering = False


def _unwind(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not _rendering:
        os._exit(STOPPED_STATUS)
    raise KeyboardInterrupt


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Renders still running are stopped (each removes its temporary file as it unwinds); nothing waits for them to
    finish their job."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(10)
        if process.is_alive():   # still unwinding after 10 s: ended, its leftovers removed by the caller
            process.kill()
            process.join()


def _run_on_ray(address: str, gpu: bool) -> Callable[[RunJob, Pairs],
                                                                      Iterator[tuple[Job, dict[str, Any]]]]:
    def run(run_job: RunJob, pairs: Pairs) -> Iterator[tuple[Job, dict[str, Any]]]:
        from stream.ray_workers import connect, disconnect

        loaded: Any = sys.modules.get("ray")   # a caller already connected (the benchmark, which times that apart)
        owned = loaded is None or not loaded.is_initialized()
        ray: Any = connect(address) if owned else loaded
        pending: dict[Any, Job] = {}
        try:
            resources = {"num_gpus": 1} if gpu and ray.cluster_resources().get("GPU") else {"num_cpus": 1}
            task = ray.remote(max_retries=0, **resources)(run_job)
            pending = {task.remote(spec): job for job, spec in pairs}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for reference in done:
                    job = pending.pop(reference)
                    try:
                        yield job, ray.get(reference)
                    except ray.exceptions.RayError as error:
                        yield job, {"status": "failed", "error": f"its Ray task failed ({first_line(error)})"}
        finally:
            if pending:   # stopped early: the running renders are interrupted, unwind and remove their temporary files
                for reference in pending:
                    ray.cancel(reference)
                ray.wait(list(pending), num_returns=len(pending), timeout=10)
            if owned:
                disconnect()

    return run


# ------------------------------------------------------------------------------------------------ telling how it goes

@dataclass
class Progress:
    """Jobs done, failed and skipped, frames per second and the time left: a bar redrawn on a terminal, a line per
    job elsewhere (a log, CI)."""

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False
    started: float = field(default_factory=time.monotonic)
    counts: dict[str, int] = field(default_factory=lambda: {"done": 0, "failed": 0, "skipped": 0})
    frames: int = 0

    def finished(self, result: Result) -> None:
        self.counts[result.status] += 1
        self.frames += result.frames
        if self.quiet:
            return
        finished = sum(self.counts.values())
        elapsed = time.monotonic() - self.started
        rendered = self.counts["done"] + self.counts["failed"]
        left = self.total - finished
        eta = f"{elapsed / rendered * left:.0f} s left" if rendered and left else ""
        figures = (f"{self.counts['done']} done, {self.counts['failed']} failed, {self.counts['skipped']} skipped, "
                   f"{self.frames / max(elapsed, 1e-6):.1f} fps")
        if self.stream.isatty():
            share = finished / self.total
            self.stream.write(f"\r\033[Kbatch [{'#' * int(share * 30):<30}] {finished}/{self.total}  {figures}"
                              f"{'  ' + eta if eta else ''}")
            if result.status == "failed":
                self.stream.write(f"\n  failed: {result.output}: {result.error}\n")
            if not left:
                self.stream.write("\n")
        else:
            what = {"done": f"done ({result.frames} frames, {result.seconds:.1f} s)", "skipped": "skipped (complete)",
                    "failed": f"failed: {result.error}"}[result.status]
            self.stream.write(f"batch {finished}/{self.total}: {result.output} {what}  [{figures}"
                              f"{', ' + eta if eta else ''}]\n")
        self.stream.flush()


def summary(results: Iterable[Result], seconds: float) -> list[str]:
    """The closing lines: the counts, then each failure with its reason."""
    results = list(results)
    count = {status: sum(result.status == status for result in results) for status in ("done", "failed", "skipped")}
    frames = sum(result.frames for result in results)
    lines = [f"talkstream batch: {count['done']} done, {count['failed']} failed, {count['skipped']} skipped "
             f"of {len(results)} jobs in {seconds:.1f} s ({frames} frames)"]
    lines += [f"  failed (line {result.line}): {result.output}: {result.error}"
              for result in results if result.status == "failed"]
    return lines


def write_report(path: Path, results: Iterable[Result], seconds: float) -> None:
    """--report: every job's status, seconds, frames and error line, as JSON (written whole or not at all)."""
    report = {"seconds": round(seconds, 3), "jobs": [asdict(result) for result in results]}
    temporary = path.with_name(f".{path.name}.part")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------------ the benchmark

BENCH_SPEECH_S = 10.0


def bench_batch(count: int, run_job: RunJob, portrait: Path, speech: Path, scratch: Path, *, preset: str,
                with_ray: bool, log: Callable[[str], None], discard_partial: Callable[[str], None]) -> dict[str, Any]:
    """`talkstream bench --batch N`: N jobs of 10 s of speech (the example's, looped) on one portrait, with 1 and 2
    workers and as Ray tasks on a local runtime: jobs per minute, and what preparing the avatar costs once per worker
    (what batch does) against once per job."""
    import wave

    with wave.open(str(speech)) as reader:
        rate, channels = reader.getframerate(), reader.getnchannels()
        pcm = reader.readframes(reader.getnframes())
    looped = scratch / "ten_seconds.wav"
    needed = int(rate * BENCH_SPEECH_S) * 2 * channels
    with wave.open(str(looped), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes((pcm * (needed // len(pcm) + 1))[:needed])
    ways: list[tuple[str, int, str | None]] = [("--jobs 1", 1, None), ("--jobs 2", 2, None)]
    if with_ray:
        ways.append(("--ray", 2, "local"))
    report: dict[str, Any] = {"jobs": count, "speech_s": BENCH_SPEECH_S, "preset": preset}
    log(f"batch: {count} jobs of {BENCH_SPEECH_S:g} s speech, preset {preset}")
    for name, workers, ray in ways:
        out = scratch / name.strip("-").replace(" ", "")
        out.mkdir()
        jobs = [Job(n + 1, str(portrait), str(looped), str(out / f"job{n}.mp4")) for n in range(count)]
        if ray is not None:   # the runtime's start is a once-a-run cost: timed apart from the jobs
            from stream.ray_workers import connect

            started = time.monotonic()
            connect(ray)
            report["ray_start_s"] = time.monotonic() - started
            log(f"  (a local Ray runtime started in {report['ray_start_s']:.1f} s)")
        started = time.monotonic()
        results = run_batch(jobs, run_job, workers=workers, ray=ray, ship_inputs=False, force=True,
                            gpu=False, progress=Progress(count, quiet=True),
                            common={"preset": preset, "overrides": [], "backend": "embedded"},
                            discard_partial=discard_partial)
        seconds = time.monotonic() - started
        if ray is not None:
            from stream.ray_workers import disconnect

            disconnect()
        failed = [result.error for result in results if result.status != "done"]
        if failed:
            raise InputError(f"the batch benchmark's jobs failed: {failed[0]}")
        prepared = [result.prepare_s for result in results if result.prepare_s > 0]
        figures = {"seconds": seconds, "jobs_per_minute": 60 * count / seconds,
                   "avatars_prepared": len(prepared), "prepare_s_each": sum(prepared) / max(1, len(prepared))}
        report[name] = figures
        log(f"  {name:9s} {figures['jobs_per_minute']:6.1f} jobs/min ({seconds:.1f} s), avatar prepared "
            f"{len(prepared)} times, {figures['prepare_s_each']:.2f} s each")
    single, double = report["--jobs 1"], report["--jobs 2"]
    report["speedup_2_over_1"] = double["jobs_per_minute"] / single["jobs_per_minute"]
    once_per_job = count * single["prepare_s_each"]
    report["prepare_once_per_job_s"] = once_per_job
    log(f"  2 workers over 1: {report['speedup_2_over_1']:.2f}x; preparing the avatar once per job would cost "
        f"{once_per_job:.1f} s of the --jobs 1 run's {single['seconds']:.1f} s (once per worker: "
        f"{single['prepare_s_each']:.2f} s)")
    if with_ray:
        report["ray_over_jobs_2"] = report["--ray"]["jobs_per_minute"] / double["jobs_per_minute"]
        log(f"  --ray over --jobs 2: {report['ray_over_jobs_2']:.2f}x")
    return report
