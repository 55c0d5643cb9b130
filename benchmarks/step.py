"""Optimizer step throughput against torch.optim (GPT-2 small, ResNet-50, 1000x20k layouts).

    python benchmarks/step.py [--layouts gpt2-small,resnet50,1000x20k] [--device cuda] [--int8]

Same as `decoupled bench`; prints the CPU and its vector instruction sets, params/s, the ratio
to torch's fused AdamW measured in the same run, and the share of the memory-bandwidth floor.
``--int8`` adds a row for ``state_dtype="int8"`` (16 bytes moved per parameter, plus the
scales). On float32 CPU parameters it steps through the C++ kernel's int8 path, limited by
its arithmetic where the bus is fast (README, "Smallest state"). ``--layouts 1x20M`` times one
20M-element tensor: the element loop alone, out of cache.
"""

import argparse

import decoupled
from decoupled import bench
from decoupled.bench import DEFAULT_LAYOUTS, Contender, run


def with_int8_row() -> None:
    """Add an int8-state contender to ``decoupled.bench``'s list for this process."""
    base = bench.contenders
    bench.BYTES_PER_PARAM["int8"] = 16  # θ, g read (8); θ written (4); m, v read + written (4)

    def contenders(include_ours: bool = True) -> list[Contender]:
        int8 = Contender(
            "decoupled.AdamW int8",
            lambda p: decoupled.AdamW(p, lr=1e-3, weight_decay=0.01, state_dtype="int8"),
            "int8",
        )
        return base(include_ours) + ([int8] if include_ours else [])

    bench.contenders = contenders


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layouts",
        default=",".join(DEFAULT_LAYOUTS),
        help="comma-separated; 1x20M (one 20M-element tensor) is not in the default list",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="add a row for int8 state")
    args = parser.parse_args()
    if args.int8:
        with_int8_row()
    print(run(args.layouts.split(","), args.device, args.steps, args.rounds))
