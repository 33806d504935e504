"""Networks-only benchmark of the face-vid2vid generator's per-frame path: `python -m stages.nets.bench`.

Random weights built in place (the spec's rule: normal / sqrt(fan_in), unit spectral vectors; no files), one cached
source encoding, then batched `render` calls timed per (size, batch, dtype, torch.compile) case after warm-up, with
CUDA synchronised around the timed loop. `--paths render forward` also times upstream's uncached call. Imports only
torch, the standard library and `stages.nets`, so it runs on a bare GPU machine.

CPU smoke run: `python -m stages.nets.bench --sizes 128 --batches 1 --iterations 1 --warmup 1` (128 is the smallest
size the generator accepts: its dense-motion hourglass halves S/4 five times).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from stages.nets.facevid2vid import NUM_KP, OcclusionAwareSPADEGenerator, use_channels_last

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class Case:
    path: str  # render (cached encoding) | forward (upstream's uncached call)
    size: int
    batch: int
    dtype: str
    compiled: bool
    fps: float | None = None
    ms_per_frame: float | None = None
    peak_memory_mb: float | None = None
    error: str | None = None


def random_weights(module: torch.nn.Module, seed: int = 0, scale: float = 0.25) -> None:
    """Fill every tensor of the state dict by the spec's random-weight rule and load it (folding spectral norm)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if not value.is_floating_point() or key.endswith(("bias", "running_mean")) or value.dim() == 0:
            state[key] = torch.zeros_like(value)
        elif key.endswith("running_var"):
            state[key] = torch.ones_like(value)
        elif key.endswith(("weight_u", "weight_v")):
            state[key] = torch.nn.functional.normalize(torch.randn(value.shape, generator=generator), dim=0)
        elif value.dim() == 1:  # norm scales
            state[key] = torch.ones_like(value)
        else:
            state[key] = scale * torch.randn(value.shape, generator=generator) / math.sqrt(value[0].numel())
    module.load_state_dict(state, strict=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call: Callable[[], torch.Tensor], device: torch.device, warmup: int, iterations: int) -> float:
    """Seconds per call, averaged over `iterations` after `warmup` calls."""
    for _ in range(warmup):
        call()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def run_case(master: OcclusionAwareSPADEGenerator, case: Case, device: torch.device, args: argparse.Namespace
             ) -> Case:
    dtype = DTYPES[case.dtype]
    network = copy.deepcopy(master).to(device=device, dtype=dtype)
    if args.memory_format == "channels_last":
        use_channels_last(network)
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    seeded = torch.Generator().manual_seed(1)
    source = torch.rand(1, 3, case.size, case.size, generator=seeded).to(device, dtype, memory_format=memory_format)
    kp_source = (0.2 * torch.randn(1, NUM_KP, 3, generator=seeded)).to(device)
    kp_driving = (kp_source + 0.02 * torch.randn(case.batch, NUM_KP, 3, generator=seeded).to(device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.inference_mode():
            call: Callable[[], torch.Tensor]  # a partial, or what torch.compile makes of it
            if case.path == "render":
                call = partial(network.render, network.encode_source(source), kp_source, kp_driving)
            else:
                call = partial(network, source.expand(case.batch, -1, -1, -1), kp_source, kp_driving)
            if case.compiled:
                torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale graphs
                call = torch.compile(call, mode=args.compile_mode, dynamic=False)
            seconds = measure(call, device, args.warmup + (2 if case.compiled else 0), args.iterations)
    except torch.OutOfMemoryError:
        return Case(**{**asdict(case), "error": "out of memory"})
    except RuntimeError as error:  # an unsupported dtype/kernel on this device, a compiler failure: report, go on
        return Case(**{**asdict(case), "error": (str(error).strip().splitlines() or ["RuntimeError"])[0][:120]})
    finally:
        del network
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Case(**{**asdict(case), "fps": case.batch / seconds, "ms_per_frame": 1000 * seconds / case.batch,
                   "peak_memory_mb": peak})


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(cases: list[Case]) -> str:
    lines = [f"{'path':8} {'size':>5} {'batch':>5} {'dtype':5} {'compile':7} {'fps':>9} {'ms/frame':>9} "
             f"{'peak MB':>8}  note"]
    for case in cases:
        lines.append(f"{case.path:8} {case.size:5d} {case.batch:5d} {case.dtype:5} "
                     f"{'on' if case.compiled else 'off':7} {_number(case.fps, 2):>9} "
                     f"{_number(case.ms_per_frame, 1):>9} {_number(case.peak_memory_mb, 0):>8}  {case.error or ''}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: bf16 fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (e.g. max-autotune)")
    parser.add_argument("--paths", nargs="+", choices=["render", "forward"], default=["render"])
    parser.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--iterations", type=int, default=10, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (+2 when compiled)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = ["bf16", "fp16"] if args.device.startswith("cuda") else ["fp32"]
    if min(args.sizes) < 128 or any(size % 128 for size in args.sizes):
        parser.error("sizes must be multiples of 128 (the dense-motion hourglass halves S/4 five times)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    master = OcclusionAwareSPADEGenerator().eval()
    random_weights(master)
    compiled = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    cases = []
    for path in args.paths:
        for dtype in args.dtypes:
            for with_compile in compiled:
                for size in args.sizes:
                    for batch in args.batches:
                        case = run_case(master, Case(path, size, batch, dtype, with_compile), device, args)
                        print(table([case]).splitlines()[1], flush=True)
                        cases.append(case)
    print()
    print(table(cases))
    if args.json:
        environment = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
                       platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "memory_format": args.memory_format, "iterations": args.iterations, "warmup": args.warmup}
        args.json.write_text(json.dumps({"environment": environment, "cases": [asdict(c) for c in cases]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
