"""Optimizer step throughput against torch.optim, on the parameter layouts of real models.

Parameters per second of one ``step()`` (excluding forward/backward), for our optimizers and
``torch.optim.AdamW`` with ``foreach=True`` and ``fused=True``, measured alternately in one
run (so a busy machine slows all of them alike), with the bandwidth floor: an Adam step in
float32 reads θ, g, m, v and writes θ, m, v — 28 bytes per parameter — so it cannot beat
``streaming bandwidth / 28`` parameters per second; with bfloat16 moments it moves 20 bytes.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import decoupled
from decoupled.optim._cpu import cpu_summary

BYTES_PER_PARAM = {"float32": 28, "bfloat16": 20}  # Adam: θ, g, m, v read; θ, m, v written


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M parameters, 148 tensors): embeddings, 12 blocks, final LayerNorm."""
    d, vocab, context = 768, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(12):
        shapes += [
            (d,),
            (d,),
            (d, 3 * d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (d, 4 * d),
            (4 * d,),
            (4 * d, d),
            (d,),
        ]
    return shapes + [(d,), (d,)]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """ResNet-50 (25.6M parameters, 161 tensors): convolutions, BatchNorm scales/shifts, fc."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [
                (width, channels, 1, 1),
                (width,),
                (width,),
                (width, width, 3, 3),
                (width,),
                (width,),
                (4 * width, width, 1, 1),
                (4 * width,),
                (4 * width,),
            ]
            if block == 0:
                shapes += [(4 * width, channels, 1, 1), (4 * width,), (4 * width,)]
            channels = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def many_small_shapes() -> list[tuple[int, ...]]:
    """1000 tensors of 20k elements: where per-tensor overhead dominates."""
    return [(20_000,)] * 1000


def one_large_shape() -> list[tuple[int, ...]]:
    """One tensor of 20M elements: the element loop alone, out of cache, with no per-tensor
    overhead (not in the default run)."""
    return [(20_000_000,)]


LAYOUTS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-small": gpt2_small_shapes,
    "resnet50": resnet50_shapes,
    "1000x20k": many_small_shapes,
    "1x20M": one_large_shape,
}
DEFAULT_LAYOUTS = ("gpt2-small", "resnet50", "1000x20k")


class StreamingBandwidth:
    """Bytes per second of an in-place streaming update (read + write of float32), measured
    again at every round of every layout: a shared machine's bus speed changes within a run, so
    the floor takes the fastest measure seen (a floor measured once, on a slow moment, let
    torch's fused step run at 150% of it)."""

    def __init__(self, device: torch.device, elements: int = 1 << 26):
        self.device, self.array = device, torch.ones(elements, device=device)
        self.measures: list[float] = []

    def measure(self, repeats: int = 3) -> float:
        best = float("inf")
        for _ in range(repeats):
            _sync(self.device)
            start = time.perf_counter()
            self.array.mul_(0.999)
            _sync(self.device)
            best = min(best, time.perf_counter() - start)
        self.measures.append(2 * 4 * self.array.numel() / best)
        return self.measures[-1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Contender:
    name: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    state: str = "float32"  # the moments' dtype: sets the bytes moved per parameter


def contenders(include_ours: bool = True) -> list[Contender]:
    kwargs = {"lr": 1e-3, "weight_decay": 0.01}
    items = [
        Contender("torch AdamW foreach", lambda p: torch.optim.AdamW(p, foreach=True, **kwargs)),
        Contender("torch AdamW fused", lambda p: torch.optim.AdamW(p, fused=True, **kwargs)),
    ]
    if include_ours:
        bf16 = {"state_dtype": torch.bfloat16}
        items += [
            Contender("decoupled.AdamW", lambda p: decoupled.AdamW(p, **kwargs)),
            Contender(
                "decoupled.AdamW bf16", lambda p: decoupled.AdamW(p, **kwargs, **bf16), "bfloat16"
            ),
            Contender("decoupled ref. loop", lambda p: decoupled.AdamW(p, fused=False, **kwargs)),
        ]
    return items


def measure_layout(
    shapes, device, steps: int = 5, rounds: int = 3, bandwidth: StreamingBandwidth | None = None
) -> dict[str, float]:
    """Median parameters/second of each contender, measured in alternating rounds (each round
    also measures ``bandwidth``, when given)."""
    params = [torch.randn(shape, device=device).requires_grad_() for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    count = sum(p.numel() for p in params)
    optimizers = {c.name: c.make(params) for c in contenders()}
    for optimizer in optimizers.values():  # create state outside the timing
        optimizer.step()
    rates: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        if bandwidth is not None:
            bandwidth.measure()
        for name, optimizer in optimizers.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            _sync(device)
            rates[name].append(count * steps / (time.perf_counter() - start))
    del optimizers, params
    gc.collect()
    return {name: statistics.median(values) for name, values in rates.items()}


def run(
    layouts: list[str] | None = None, device: str | None = None, steps: int = 5, rounds: int = 3
) -> str:
    """Measure and return the table as text."""
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bandwidth = StreamingBandwidth(device_)
    bandwidth.measure()
    state_of = {c.name: c.state for c in contenders()}
    rows = []
    for layout in layouts or list(DEFAULT_LAYOUTS):
        shapes = LAYOUTS[layout]()
        count = sum(torch.Size(s).numel() for s in shapes)
        rows.append(
            (layout, len(shapes), count, measure_layout(shapes, device_, steps, rounds, bandwidth))
        )
    fastest = max(bandwidth.measures)
    floor = {state: fastest / size for state, size in BYTES_PER_PARAM.items()}
    lines = [
        cpu_summary(),
        f"device {device_}, {torch.get_num_threads()} threads; streaming bandwidth "
        f"{min(bandwidth.measures) / 1e9:.1f}-{fastest / 1e9:.1f} GB/s during the run -> Adam "
        f"floor {floor['float32'] / 1e9:.2f} G params/s (float32 state), "
        f"{floor['bfloat16'] / 1e9:.2f} (bfloat16), from the fastest",
        f"{'layout':<12}{'tensors':>8}{'params':>9}  {'optimizer':<22}{'G params/s':>11}"
        f"{'vs fused':>10}{'of floor':>10}",
    ]
    for layout, tensors, count, rates in rows:
        fused = rates["torch AdamW fused"]
        for name, rate in rates.items():
            lines.append(
                f"{layout:<12}{tensors:>8}{count / 1e6:>8.1f}M  {name:<22}"
                f"{rate / 1e9:>11.3f}{rate / fused:>9.2f}x{rate / floor[state_of[name]]:>9.0%}"
            )
    return "\n".join(lines)
