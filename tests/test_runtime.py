"""How train.py uses the machine: torch threads and mixed precision, decided at start (oner.training.runtime)."""

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

from oner.training import runtime


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND",
                 "ACCELERATE_MIXED_PRECISION", "ACCELERATE_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    return monkeypatch


def test_launcher_default_of_one_thread_becomes_the_cores_per_process(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "1")
    clean_env.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # set by every `accelerate launch`
    assert runtime.choose_num_threads(None)[0] == 8
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine share the cores
    threads, reason = runtime.choose_num_threads(None)
    assert threads == 4 and "launcher's default" in reason


def test_explicit_thread_settings_are_respected(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "1")  # exported by the user for `python train.py`: no launcher
    assert runtime.choose_num_threads(None) == (1, "OMP_NUM_THREADS")
    clean_env.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    clean_env.setenv("OMP_NUM_THREADS", "3")  # a launcher value other than its default 1
    assert runtime.choose_num_threads(None) == (3, "OMP_NUM_THREADS")
    clean_env.setenv("OMP_NUM_THREADS", "1")
    assert runtime.choose_num_threads(1) == (1, "--num_threads")  # the flag wins over everything
    clean_env.delenv("OMP_NUM_THREADS")
    assert runtime.choose_num_threads(None)[0] == 8  # unset: all cores


def test_configure_threads_sets_torch(clean_env):
    import torch

    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(1)[0] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "no")])
def test_precision_follows_native_bf16_on_the_cpu(clean_env, native, expected):
    clean_env.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.choose_mixed_precision(None, "cpu")[0] == expected
    # accelerate launch's own default "no", with no accelerate config file, does not count as a choice
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    clean_env.setenv("ACCELERATE_CONFIG_FILE", "/nonexistent/default_config.yaml")
    assert runtime.choose_mixed_precision(None, "cpu")[0] == expected


def test_precision_from_the_user_or_accelerate_config_wins(clean_env, tmp_path):
    clean_env.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.choose_mixed_precision("fp32", "cpu") == ("no", "--mixed_precision")
    assert runtime.choose_mixed_precision("no", "cpu")[0] == "no"
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    assert runtime.choose_mixed_precision(None, "cpu")[0] == "fp16"
    config = tmp_path / "default_config.yaml"
    config.write_text("mixed_precision: 'no'\n")
    clean_env.setenv("ACCELERATE_CONFIG_FILE", str(config))
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "no")  # chosen in `accelerate config`: respected
    assert runtime.choose_mixed_precision(None, "cpu")[0] == "no"


def test_cpu_flag_detection_reads_proc_cpuinfo(monkeypatch, tmp_path):
    from pathlib import Path

    fake = tmp_path / "cpuinfo"
    real_path = Path

    def patched(path, *args):
        return real_path(fake) if str(path) == "/proc/cpuinfo" else real_path(path, *args)

    monkeypatch.setattr(runtime, "Path", patched)
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert runtime.cpu_has_native_bf16()
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 amx_tile amx_bf16\n")
    assert runtime.cpu_has_native_bf16()
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not runtime.cpu_has_native_bf16()


def test_slow_cpu_paths_are_named_with_their_cost(clean_env):
    # bf16 whose matrix products are no faster than fp32 (emulated, as on CPUs without AVX-512 BF16/AMX)
    clean_env.setattr(runtime, "matmul_speedup", lambda dtype: 0.08)
    clean_env.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    (warning,) = runtime.cpu_slow_paths("bf16", "eager", threads=2)
    assert "0.08x the fp32 speed" in warning and "no native bf16" in warning and "--mixed_precision no" in warning
    # a CPU where bf16 pays: nothing to say; fp32 is never measured
    clean_env.setattr(runtime, "matmul_speedup", lambda dtype: 7.5)
    assert runtime.cpu_slow_paths("bf16", "eager", threads=2) == []
    clean_env.setattr(runtime, "matmul_speedup", lambda dtype: pytest.fail("fp32 needs no measurement"))
    assert runtime.cpu_slow_paths("no", "eager", threads=8) == []
    # SDPA's slow CPU backward and more threads than cores
    warnings = runtime.cpu_slow_paths("no", "sdpa", threads=16)
    assert len(warnings) == 2 and "eager" in warnings[0] and "16 threads on 8 cores" in warnings[1]


def test_matmul_speedup_is_measured():
    import torch

    before = torch.get_rng_state()
    speedup = runtime.matmul_speedup(torch.bfloat16, size=64, seconds=0.01, rounds=1)
    assert speedup > 0 and speedup != float("inf")  # a ratio of two measured times (never asserted: noisy machines)
    assert torch.equal(torch.get_rng_state(), before)  # a resumed run's random stream is left alone


FAULTS_BEFORE_AND_AFTER = """
import ctypes, resource, torch
from oner.training.runtime import keep_freed_memory

def faults_of_a_step():  # what a training step does: many tensors written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(256 * 1024) for _ in range(64)]  # 64 x 1 MiB = 16,384 pages
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

# glibc's static defaults (128 KiB mmap and trim thresholds, no dynamic growth), so that the
# starting point does not depend on what the process allocated before
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(-3, 128 * 1024) == 1 and libc.mallopt(-1, 128 * 1024) == 1
faults_of_a_step()
default = faults_of_a_step()
said = keep_freed_memory()
faults_of_a_step()
print(said)
print(default, faults_of_a_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_so_the_next_step_does_not_fault_it_in_again():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", FAULTS_BEFORE_AND_AFTER], capture_output=True, text=True,
                         check=True, env=env).stdout.strip().splitlines()
    said, (default_faults, kept_faults) = out[-2], map(int, out[-1].split())
    assert "keeps up to 1024 MiB" in said
    # glibc's defaults give the 64 MiB back to the kernel and fault them in again every step
    assert default_faults > 8000 and kept_faults < 1000, (default_faults, kept_faults)


def test_the_users_allocator_choice_is_left_alone(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("mallopt must not be called"))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert runtime.keep_freed_memory() == "malloc as set by MALLOC_TRIM_THRESHOLD_"
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert runtime.keep_freed_memory() == "malloc from jemalloc (LD_PRELOAD)"


def test_keep_freed_memory_sets_the_three_glibc_parameters(monkeypatch):
    calls = []

    class FakeGlibc:
        def gnu_get_libc_version(self):
            return b"2.36"

        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    for name in (*runtime._MALLOC_ENV, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(ctypes, "CDLL", lambda path: FakeGlibc())
    assert "keeps up to 512 MiB" in runtime.keep_freed_memory(trim_threshold=512 << 20)
    assert sorted(calls) == [(-3, 32 << 20), (-2, 64 << 20), (-1, 512 << 20)]  # mmap, top pad, trim (<malloc.h>)
    calls.clear()
    FakeGlibc.mallopt = lambda self, param, value: 0  # glibc refuses a value
    assert "refused" in runtime.keep_freed_memory()
