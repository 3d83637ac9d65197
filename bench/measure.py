"""The measurements: interleaved timing (wall and process CPU time), peak memory of one call, machine facts.

Timing: every callable of a group is warmed up, calibrated to last `min_time` per sample (back-to-back calls),
then sampled once per repeat in an order rotated per repeat, so load on the machine hits every callable alike;
the median over repeats is reported and every sample is kept.

Memory (CPU): one call, measured in a clean child process that has built only its own subject (see
`engine.measure_memory`): the rise of the resident set during the call (the kernel's RSS high-water mark is
reset through /proc/self/clear_refs before it: VmHWM after - VmRSS before, so oneDNN / MKL workspaces count),
and the peak bytes PyTorch's allocator hands out during the call beyond what was allocated before it (the
running sum of torch.profiler's allocation events: exact for tensor memory, independent of machine load).
CUDA: torch.cuda.max_memory_allocated above the memory allocated before the call.
"""
import ctypes
import gc
import math
import platform
import time
from typing import Any, Callable, Optional, Tuple

__all__ = ['sample', 'calibrate', 'peak_allocated', 'peak_alloc_mib', 'rss_rise_mib', 'cuda_peak_mib', 'cpu_name', 'MIB']

MIB = 2 ** 20


def _sync(device: str) -> None:
    if device == 'cuda':
        import torch
        torch.cuda.synchronize()


def sample(fn: Callable[[], Any], iters: int, device: str) -> Tuple[float, float]:
    """(wall ms, process CPU ms) per call over `iters` back-to-back calls."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    return 1000 * (t1 - t0) / iters, 1000 * (c1 - c0) / iters


def calibrate(fn: Callable[[], Any], warmup: int, min_time: float, device: str = 'cpu') -> int:
    """Run `warmup` untimed calls, then return the calls per sample that make one sample last `min_time` s."""
    for _ in range(warmup):
        fn()
    if min_time <= 0:
        return 1
    once, _ = sample(fn, 1, device)
    return max(1, min(10000, math.ceil(min_time * 1000 / max(once, 1e-6))))


def peak_allocated(fn: Callable[[], Any]) -> Tuple[int, int]:
    """(peak, net) bytes PyTorch's CPU allocator hands out while `fn()` runs, beyond what was allocated before:
    the running sum of torch.profiler's allocation (+) and free (-) events. `fn`'s result is dropped inside the
    measured region, so `net` is what the call keeps (caches)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def run():
        fn()  # the result is freed when this frame ends, still inside the profiled region

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as e:  # a torch without the kineto event list
        raise RuntimeError(f'torch {torch.__version__}: the profiler exposes no allocation events ({e})') from e
    deltas = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events) if e.name() == '[memory]')
    total = peak = 0
    for _, _, nbytes in deltas:
        total += nbytes
        peak = max(peak, total)
    return peak, total


def peak_alloc_mib(fn: Callable[[], Any]) -> float:
    """Peak MiB of tensor memory allocated during `fn()` beyond what was allocated before (`peak_allocated`)."""
    return peak_allocated(fn)[0] / MIB


def _status_kb(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_rise_mib(fn: Callable[[], Any]) -> Tuple[Optional[float], str]:
    """(MiB, method): the rise of this process's peak RSS during `fn()` over its RSS before. Linux: the RSS
    high-water mark is reset first (/proc/self/clear_refs); elsewhere ru_maxrss (a lower bound) is used."""
    import resource
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:
        pass
    before = _status_kb('VmRSS')
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        scale = 1024 if platform.system() == 'Darwin' else 1  # ru_maxrss: bytes there, kB on Linux
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale
        result = fn()
        del result
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale
        return max(peak - max(start, before or 0), 0) / 1024, 'ru_maxrss-delta (lower bound)'
    result = fn()
    peak = _status_kb('VmHWM')
    del result
    if before is None or peak is None:
        return None, 'unavailable'
    return max(peak - before, 0) / 1024, 'VmHWM-VmRSS'


def cuda_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak CUDA MiB allocated during `fn()` above what was allocated before it."""
    import torch
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - base) / MIB


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
