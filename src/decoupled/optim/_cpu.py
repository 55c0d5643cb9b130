"""What CPU this is and which vector instruction sets it has, for every published figure.

A throughput is a property of a CPU as much as of the code: the one-pass kernel's bfloat16
loop runs at about 5x the speed with AVX2 vectorization than without it, and AVX-512 changes
the figures again. ``decoupled bench`` prints :func:`cpu_summary` above its table.
"""

from __future__ import annotations

import platform
from pathlib import Path

# the flags that matter for the kernel's loops, in the order they are printed
_VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "neon",
                 "asimd", "sve")  # fmt: skip


def _cpuinfo() -> tuple[str, set[str]]:
    """The model name and the feature flags of the first CPU in ``/proc/cpuinfo`` (Linux);
    ``platform.processor()`` and no flags elsewhere."""
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags


def cpu_summary() -> str:
    """One line: the CPU model, its logical cores, the vector instruction sets detected, the
    ``-march`` our kernel is built for and the instruction set torch's own CPU kernels run
    (``ATEN_CPU_CAPABILITY`` lowers it, e.g. to ``avx2``: with ``DECOUPLED_KERNEL_ARCH=x86-64-v3``
    both sides of a comparison then run an AVX2 machine's code), e.g. ``CPU AMD EPYC (2 logical
    cores, x86_64); vector ISA: avx2 fma avx512f; kernel built for -march=native; torch
    kernels: AVX512``."""
    import os

    import torch

    from decoupled.optim._build import kernel_arch

    model, flags = _cpuinfo()
    found = [flag for flag in _VECTOR_FLAGS if flag in flags] or ["none detected"]
    arch = kernel_arch() or "native"
    return (
        f"CPU {model} ({os.cpu_count()} logical cores, {platform.machine()}); "
        f"vector ISA: {' '.join(found)}; kernel built for -march={arch}; "
        f"torch kernels: {torch.backends.cpu.get_cpu_capability()}"
    )
