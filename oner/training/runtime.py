"""How a training process uses its machine: CPU threads, mixed precision and freed memory.

All of them (and the attention kernel) are decided once, at start, and logged. The user's explicit choice always wins; the
automatic choice only replaces launcher DEFAULTS that would leave the machine half used:

- threads: `accelerate launch` sets `OMP_NUM_THREADS=1` whenever `--num_cpu_threads_per_process`
  is not given, so a CPU run would use one core of many. When the process was started by a
  launcher (`accelerate launch`, torchrun) and `OMP_NUM_THREADS` is that default `1`, or when it is unset,
  torch gets the cores this process may run on (its CPU affinity) divided by the processes on this
  machine. `--num_threads N` or an `OMP_NUM_THREADS` other than 1 is taken as given; so is a
  `OMP_NUM_THREADS=1` exported for a plain `python train.py` (no launcher).
- precision: `--mixed_precision` if given; else what `accelerate config` / `accelerate launch
  --mixed_precision` chose (`ACCELERATE_MIXED_PRECISION`), unless that is the launcher's own
  default `no` with no accelerate config file; else bf16 where the device computes it natively
  (a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX) and fp32 elsewhere.
- freed memory: on Linux with glibc, freed tensor memory stays with the process between steps
  (`keep_freed_memory`), unless the user set glibc's `MALLOC_*` variables or preloaded another allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under `taskset`), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this job on this machine (torchrun/accelerate set `LOCAL_WORLD_SIZE`)."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def launched_by_launcher() -> bool:
    """True under `accelerate launch` (every launcher path sets `ACCELERATE_DYNAMO_BACKEND`) or torchrun
    (`LOCAL_RANK`)."""
    return "ACCELERATE_DYNAMO_BACKEND" in os.environ or "LOCAL_RANK" in os.environ


def choose_num_threads(requested: int | None) -> tuple[int, str]:
    """`(threads, reason)` for torch's intra-op pool on this process (see the module doc)."""
    if requested:
        return requested, "--num_threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    fair_share = max(available_cores() // local_processes(), 1)
    if not omp:
        return fair_share, f"{available_cores()} cores / {local_processes()} process(es) on this machine"
    try:
        value = int(omp)
    except ValueError:
        return fair_share, f"OMP_NUM_THREADS={omp!r} is not a number; {fair_share} = cores / processes"
    if value == 1 and launched_by_launcher():
        return fair_share, (
            f"OMP_NUM_THREADS=1 is the launcher's default; {available_cores()} cores / {local_processes()} "
            "process(es) (pass --num_threads 1 to keep one)"
        )
    return max(value, 1), "OMP_NUM_THREADS"


def configure_threads(requested: int | None) -> tuple[int, str]:
    """Set torch's intra-op threads as `choose_num_threads` says; returns what it chose and why."""
    threads, reason = choose_num_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads, reason


# glibc's `mallopt` parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def keep_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 32 << 20,
                      top_pad: int = 64 << 20) -> str:
    """Keep freed tensor memory in the process between training steps (glibc `mallopt`); returns
    what was done, for the `compute:` line.

    A CPU step allocates and frees the same tensors every step. By default glibc maps large blocks
    freshly from the kernel and returns the top of its heap once 128 KiB are free there, so each step
    faults its memory in again, page by page, and the kernel zeroes every page. Measured on the
    default bf16 step (2-core AMD EPYC, one thread): 16,800 page faults and 28 ms of kernel time per
    step before, 500 and under 4 ms after (docs/benchmarks.md). The process keeps up to
    `trim_threshold` bytes freed at the heap's top; blocks above `mmap_threshold` (glibc's upper
    limit, 32 MiB) are still mapped and returned.

    Left alone where the user chose: any `MALLOC_*` tuning variable of glibc set, or jemalloc,
    tcmalloc or mimalloc in `LD_PRELOAD`; and where glibc is not the C library.
    """
    chosen = [name for name in _MALLOC_ENV if name in os.environ]
    if chosen:
        return f"malloc as set by {', '.join(chosen)}"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"malloc from {name} (LD_PRELOAD)"
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path) if path else None
    except OSError:
        libc = None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return "malloc: the C library's defaults (not glibc)"
    done = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))
    if not done:
        return "malloc: glibc refused the tuning (its defaults)"
    return (f"malloc keeps up to {trim_threshold >> 20} MiB of freed memory (glibc; set MALLOC_TRIM_THRESHOLD_ "
            "to choose yourself)")


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX-BF16 in the CPU flags (Linux `/proc/cpuinfo`); False when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def has_accelerator_device() -> bool:
    """A GPU or another accelerator torch can use (CUDA, XPU, MPS, ...); False on a CPU-only machine."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def device_has_native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return cpu_has_native_bf16()
    return False  # MPS, XPU, ...: leave it to the user


def _accelerate_config_file_exists() -> bool:
    if os.environ.get("ACCELERATE_CONFIG_FILE"):
        return Path(os.environ["ACCELERATE_CONFIG_FILE"]).is_file()
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:  # pragma: no cover - accelerate moved it
        return False
    return Path(default_config_file).is_file()


def choose_attn_implementation(requested: str | None, device_type: str) -> tuple[str, str]:
    """`(implementation, reason)` for training: `eager` on CPUs, where torch's SDPA flash-attention
    BACKWARD dominates a small model's step (measured: docs/benchmarks.md), `sdpa` elsewhere."""
    if requested:
        return requested, "--attn_implementation"
    if device_type == "cpu":
        return "eager", "CPU training: SDPA's flash-attention backward is the slow part of the step"
    return "sdpa", f"{device_type}: fused attention kernels"


def choose_mixed_precision(requested: str | None, device_type: str) -> tuple[str, str]:
    """`(mode, reason)`: `no`, `bf16` or `fp16` for `Accelerator(mixed_precision=...)`."""
    if requested:
        return ("no" if requested == "fp32" else requested), "--mixed_precision"
    from_launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if from_launcher and (from_launcher != "no" or _accelerate_config_file_exists()):
        return from_launcher, "accelerate config / accelerate launch --mixed_precision"
    if device_has_native_bf16(device_type):
        return "bf16", f"the {device_type} computes bf16 natively"
    return "no", f"no native bf16 on the {device_type}"


def matmul_speedup(dtype: torch.dtype, size: int = 256, seconds: float = 0.05, rounds: int = 3) -> float:
    """How many times faster this CPU multiplies `size x size` matrices in `dtype` than in fp32, with
    the current threads: e.g. 4 or more for bf16 on AMX, well below 1 where bf16 is emulated. Used once
    at start to tell the user what a precision costs HERE; costs about `2 * rounds * seconds`.

    The two dtypes are timed in turns and each keeps its fastest single product: on a shared, busy
    machine the other jobs only ever slow a product down, so the fastest is the least disturbed."""
    import time

    generator = torch.Generator().manual_seed(0)  # never the global RNG: a resumed run must continue it exactly
    pairs = {dt: [torch.rand(size, size, generator=generator).to(dt) for _ in range(2)] for dt in (dtype, torch.float32)}
    fastest = dict.fromkeys(pairs, float("inf"))
    for _ in range(rounds):
        for dt, (a, b) in pairs.items():
            a @ b  # warm-up: first-call dispatch and packing
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                t = time.perf_counter()
                a @ b
                fastest[dt] = min(fastest[dt], time.perf_counter() - t)
    return fastest[torch.float32] / fastest[dtype]


def cpu_slow_paths(mixed_precision: str, attn_implementation: str, threads: int) -> list[str]:
    """Settings under which THIS CPU trains far below its fast path, each as one warning.

    Nothing is changed: an explicit choice is the user's, and the warning says what it costs and
    what is faster. The precision is judged by `matmul_speedup`, measured now (bf16 autocast on a
    CPU without AVX-512 BF16 / AMX is emulated: a 2-core AVX2 EPYC trained the default 13x slower
    than in fp32; fp16 has no fast matrix unit on CPUs without AMX-FP16).
    """
    warnings = []
    if mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        speedup = matmul_speedup(dtype)
        if speedup < 1.2:
            kind = "native" if mixed_precision == "bf16" and cpu_has_native_bf16() else "no native"
            warnings.append(
                f"{mixed_precision} matrix products run at {speedup:.2f}x the fp32 speed on this CPU ({kind} "
                f"{mixed_precision} support), so {mixed_precision} autocast only adds casts and can make steps "
                "many times slower; --mixed_precision no trains faster here"
            )
    if attn_implementation == "sdpa":
        warnings.append("sdpa attention: its CPU flash-attention backward measured 1.6-1.8x slower per step than "
                        "eager for the tiny preset (docs/benchmarks.md); --attn_implementation eager is the CPU default")
    if threads > available_cores():
        warnings.append(f"{threads} threads on {available_cores()} cores: oversubscribed threads wait on each other; "
                        f"--num_threads {available_cores()} or fewer")
    return warnings
