"""The built kernel's element loops run on vector lanes: every Adam step function (each
template instance: θ and state dtypes, decay convention, θ₀, cautious, compensated, int8)
divides and takes square roots with packed instructions, and every SGD one multiplies with
them. A loop the compiler leaves scalar still gives the right numbers, so no other test sees
it; it runs several times slower (cautious decay toward θ₀ did, on every x86 build, 11×).

Read from the disassembly of the kernel built for this machine, and (``-m slow``) of one built
for AVX2 (x86-64 only)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from decoupled.optim import _build
from decoupled.optim._cpu import _cpuinfo

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("objdump") is None,
    reason="reads x86-64 disassembly with objdump",
)

_FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
_ALIAS = re.compile(r"^[0-9a-f]+:\s+jmp\s+[0-9a-f]+ <.*(adam_int8_block|adam_chunk|sgd_chunk)<")
_STEP_FUNCTIONS = {  # name prefix -> the packed instructions its element loop must contain
    "adam_chunk<": ("vdivps", "vsqrtps"),
    "adam_int8_block<": ("vdivps", "vsqrtps"),
    "sgd_chunk<": ("vfmadd", "vmulps"),  # either: the momentum and weight updates
}


def built_library(arch: str | None) -> str:
    """The kernel's shared library for ``-march=arch`` (None: this process's own build)."""
    if arch is None:
        ops = _build.kernel_ops()
        if ops is None:
            pytest.skip("the C++ kernel is not built here")
        return ops.__file__
    script = "from decoupled.optim import _build; print(_build.kernel_ops().__file__)"
    environment = {**os.environ, "DECOUPLED_KERNEL_ARCH": arch}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def step_functions(arch: str | None = None) -> dict[str, str]:
    """Each step function's demangled name and disassembly."""
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", built_library(arch)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    functions, name, lines = {}, None, []
    for line in listing.splitlines():
        if match := _FUNCTION.match(line):
            if name is not None:
                functions[name] = "\n".join(lines)
            name, lines = match.group(1).replace("(anonymous namespace)::", ""), []
        else:
            lines.append(line)
    if name is not None:
        functions[name] = "\n".join(lines)
    return {
        name: body
        for name, body in functions.items()
        if any(re.match(r"(void )?" + re.escape(prefix), name) for prefix in _STEP_FUNCTIONS)
    }


_CPU_FLAGS = _cpuinfo()[1]  # empty where /proc/cpuinfo is not
AVX2 = "avx2" in _CPU_FLAGS


@pytest.mark.parametrize(
    "arch",
    [
        None,
        pytest.param(
            "x86-64-v3",
            marks=[
                pytest.mark.slow,  # a second build of the kernel, about a minute
                pytest.mark.skipif(not AVX2, reason="an AVX2 build runs on an AVX2 CPU"),
            ],
        ),
    ],
    ids=["native", "x86-64-v3"],
)
def test_every_element_loop_runs_on_vector_lanes(arch):
    """Without AVX-512's masked instructions, GCC if-converts less: the AVX2 build (Zen 2,
    Haswell) is where a branch in a loop body shows first."""
    functions = step_functions(arch)
    assert len(functions) > 100  # the template instances, not a renamed few
    scalar = []
    for name, body in functions.items():
        if _ALIAS.match(body.strip().splitlines()[0]):
            continue  # identical code folded: a jump to another instance, itself checked
        prefix = next(p for p in _STEP_FUNCTIONS if p in name)
        wanted = _STEP_FUNCTIONS[prefix]
        packed = [op for op in wanted if re.search(rf"\b{op}\w*ps\b|\b{op}\b", body)]
        if (prefix.startswith("sgd") and not packed) or (
            not prefix.startswith("sgd") and len(packed) < len(wanted)
        ):
            scalar.append(name[:160])
    assert not scalar, f"{len(scalar)} element loops left scalar:\n" + "\n".join(scalar)


@pytest.mark.skipif("avx512f" not in _CPU_FLAGS, reason="512-bit vectors need AVX-512")
def test_the_native_build_uses_512_bit_vectors_where_the_cpu_has_them():
    """GCC's tuning for Intel cores keeps AVX-512 code 256 bits wide unless told otherwise
    (`-mprefer-vector-width=512`, _build.compile_flags); the int8 and compensated steps, bound
    by their arithmetic, were 25-45% slower so on a Xeon. Every Adam and SGD step function
    must use zmm registers."""
    narrow = [
        name[:160]
        for name, body in step_functions().items()
        if not _ALIAS.match(body.strip().splitlines()[0]) and "%zmm" not in body
    ]
    assert not narrow, f"{len(narrow)} step functions without 512-bit vectors:\n" + "\n".join(
        narrow
    )
