"""Optimizer step throughput against torch.optim (GPT-2 small, ResNet-50, 1000x20k layouts).

    python benchmarks/step.py [--layouts gpt2-small,resnet50,1000x20k] [--device cuda]

Same as `decoupled bench`; prints params/s, the ratio to torch's fused AdamW measured in the
same run, and the share of the memory-bandwidth floor.
"""

import argparse

from decoupled.bench import LAYOUTS, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(run(args.layouts.split(","), args.device, args.steps, args.rounds))
