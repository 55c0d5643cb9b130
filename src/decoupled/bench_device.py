"""``decoupled bench --device cuda``: the Triton path against torch's AdamW on a GPU.

Measured alternately in one run (a busy or throttled device slows every contender alike):

- optimizer steps alone, in parameters per second, on the layouts of ``bench.py`` (GPT-2
  small, ResNet-50, 1000 tensors of 20k elements): decoupled.AdamW through the Triton kernel
  with float32, bfloat16 and int8 moments (``_int8.py``), and on bfloat16 θ with its 8-bit
  remainder (``compensate``, ``_compensated.py``) with bfloat16 and int8 moments;
  torch.optim.AdamW ``foreach=True`` and ``fused=True`` (float32 θ);
- the device-to-device copy bandwidth (``dst.copy_(src)``: read + write) and the floor it
  implies: a float32 Adam step moves 28 bytes per parameter (θ, g, m, v read; θ, m, v
  written), 20 with bfloat16 moments, 16 with int8 moments (θ, g 4 bytes and m, v 1 read;
  θ, m, v written; the scales add 1/16 byte), 16 for compensated bfloat16 θ (θ, g, m, v 2
  bytes each and r 1, read; θ, r, m, v written), 12 for compensated bfloat16 θ with int8
  moments, so a step cannot beat ``bandwidth / bytes`` params/s;
- one whole training step (forward, backward, step) of a GPT-2-small-shaped model (12 blocks,
  d = 768, vocabulary 50257; Radford et al. 2019) with each optimizer of float32 θ (under
  bfloat16 autocast; a bfloat16 model's forward and backward would cost otherwise).

``--device cpu --triton`` runs the same code end to end under the Triton interpreter on tiny
layouts and a tiny model (a check that it works, not a measurement).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import decoupled
from decoupled.bench import BYTES_PER_PARAM, LAYOUTS

#: Bytes one Adam step moves per parameter, by moments' dtype and θ's (module docstring).
STEP_BYTES = BYTES_PER_PARAM | {"int8": 16, "compensated bfloat16": 16, "compensated int8": 12}


def tiny_shapes(layout: str) -> list[tuple[int, ...]]:
    """A few tensors of ``layout`` with every dimension cut to at most 12 (interpreter runs)."""
    shapes = LAYOUTS[layout]()[:12]
    return [tuple(min(size, 12) for size in shape) for shape in shapes]


def contenders(device: torch.device) -> dict[str, tuple[Callable, str, torch.dtype]]:
    """name -> (make optimizer from params, its ``STEP_BYTES`` key, θ's dtype)."""
    kwargs = {"lr": 1e-3, "weight_decay": 0.01}
    fused_ok = device.type == "cuda" or hasattr(torch, "_fused_adamw_")
    items = {
        "decoupled triton": (
            lambda p: decoupled.AdamW(p, triton=True, **kwargs),
            "float32",
            torch.float32,
        ),
        "decoupled triton bf16": (
            lambda p: decoupled.AdamW(p, triton=True, state_dtype=torch.bfloat16, **kwargs),
            "bfloat16",
            torch.float32,
        ),
        "decoupled triton int8": (
            lambda p: decoupled.AdamW(p, triton=True, state_dtype="int8", **kwargs),
            "int8",
            torch.float32,
        ),
        "decoupled triton bf16 θ+r": (  # compensated bfloat16 θ, bfloat16 moments
            lambda p: decoupled.AdamW(p, triton=True, **kwargs),
            "compensated bfloat16",
            torch.bfloat16,
        ),
        "decoupled triton bf16 θ+r int8": (
            lambda p: decoupled.AdamW(p, triton=True, state_dtype="int8", **kwargs),
            "compensated int8",
            torch.bfloat16,
        ),
        "torch AdamW foreach": (
            lambda p: torch.optim.AdamW(p, foreach=True, **kwargs),
            "float32",
            torch.float32,
        ),
    }
    if fused_ok:
        items["torch AdamW fused"] = (
            lambda p: torch.optim.AdamW(p, fused=True, **kwargs),
            "float32",
            torch.float32,
        )
    return items


def copy_bandwidth(device: torch.device, elements: int, repeats: int = 5) -> float:
    """Bytes per second of a device-to-device copy of float32 (each byte read and written)."""
    src = torch.ones(elements, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alternate(runs: dict[str, Callable[[], None]], device, steps: int, rounds: int) -> dict:
    """Median seconds per call of each run, the runs taking turns round after round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                run()
            _sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_steps(shapes, device, steps: int, rounds: int) -> dict[str, float]:
    """Parameters per second of ``step()`` alone for each contender (float32 θ, or a
    bfloat16 copy for the contenders of bfloat16 θ)."""
    params = [torch.randn(shape, device=device).requires_grad_() for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    count = sum(p.numel() for p in params)
    chosen = contenders(device)
    by_dtype = {torch.float32: params}
    for dtype in {dtype for _, _, dtype in chosen.values()} - {torch.float32}:
        by_dtype[dtype] = [p.detach().to(dtype).requires_grad_() for p in params]
        for copy, p in zip(by_dtype[dtype], params):
            copy.grad = p.grad.to(dtype)
    optimizers = {name: make(by_dtype[dtype]) for name, (make, _, dtype) in chosen.items()}
    for optimizer in optimizers.values():  # state and tables created outside the timing
        optimizer.step()
    seconds = _alternate({n: o.step for n, o in optimizers.items()}, device, steps, rounds)
    del optimizers, params, by_dtype
    gc.collect()
    return {name: count / value for name, value in seconds.items()}


class Block(nn.Module):
    """A GPT-2 block: pre-LayerNorm causal self-attention and a 4x MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        batch, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attention = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, length, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2's shapes (token and position embeddings, blocks, final LayerNorm, tied head)."""

    def __init__(self, vocab: int, context: int, d: int, layers: int, heads: int):
        super().__init__()
        self.token, self.position = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.blocks(self.token(tokens) + self.position(positions))
        return self.ln(x) @ self.token.weight.T


def measure_training_step(device, tiny: bool, steps: int, rounds: int) -> dict[str, float]:
    """Seconds of one forward + backward + step of a GPT-2-small-shaped model per optimizer
    (bfloat16 autocast on CUDA)."""
    size = (64, 16, 16, 2, 2) if tiny else (50257, 1024, 768, 12, 12)
    batch, length = (2, 16) if tiny else (8, 1024)
    torch.manual_seed(0)
    model = GPT(*size).to(device)
    tokens = torch.randint(0, size[0], (batch, length + 1), device=device)
    optimizers = {  # under the interpreter (tiny) without int8 moments: slow there
        name: make(list(model.parameters()))
        for name, (make, state, dtype) in contenders(device).items()
        if dtype == torch.float32 and not (tiny and state == "int8")
    }

    def training_step(optimizer) -> None:
        optimizer.zero_grad(set_to_none=False)  # gradients stay put: cached launch tables
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()

    for optimizer in optimizers.values():
        training_step(optimizer)
    runs = {name: (lambda o=o: training_step(o)) for name, o in optimizers.items()}
    return _alternate(runs, device, steps, rounds)


def run(layouts: list[str], device: str, steps: int = 20, rounds: int = 5, tiny: bool = False):
    """Measure and return the table as text (``tiny``: interpreter-sized layouts and model)."""
    device_ = torch.device(device)
    bandwidth = copy_bandwidth(device_, 1 << 12 if tiny else 1 << 28)
    floor = {state: bandwidth / size for state, size in STEP_BYTES.items()}
    name = torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu (interpreter)"
    lines = [
        f"device {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s -> Adam floor "
        f"{floor['float32'] / 1e9:.2f} G params/s (float32 state), "
        f"{floor['bfloat16'] / 1e9:.2f} (bfloat16)",
        f"{'layout':<12}{'tensors':>8}{'params':>9}  {'optimizer':<30}{'G params/s':>11}"
        f"{'vs fused':>10}{'of floor':>10}",
    ]
    states = {name: state for name, (_, state, _) in contenders(device_).items()}
    for layout in layouts:
        shapes = tiny_shapes(layout) if tiny else LAYOUTS[layout]()
        count = sum(torch.Size(s).numel() for s in shapes)
        rates = measure_steps(shapes, device_, steps, rounds)
        baseline = rates.get("torch AdamW fused", rates["torch AdamW foreach"])
        for contender, rate in rates.items():
            lines.append(
                f"{layout:<12}{len(shapes):>8}{count / 1e6:>8.3f}M  {contender:<30}"
                f"{rate / 1e9:>11.3f}{rate / baseline:>9.2f}x"
                f"{rate / floor[states[contender]]:>9.0%}"
            )
    seconds = measure_training_step(device_, tiny, max(1, steps // 4), rounds)
    lines.append("whole training step (forward + backward + step), GPT-2-small shapes:")
    baseline = seconds.get("torch AdamW fused", seconds["torch AdamW foreach"])
    for contender, value in seconds.items():
        lines.append(f"  {contender:<30}{value * 1e3:>10.2f} ms{baseline / value:>9.2f}x")
    return "\n".join(lines)
