"""CharLM: a small causal Transformer over the bytes of Python's own standard library.

The corpus is whatever interpreter runs the lab: every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]`` (test suites and ``site-packages`` left out), so it is
always there, offline, and big enough (about 10.7 MB on CPython 3.11) that a short run never
repeats a window. Files go to validation by a hash of their relative path, so the split is
fixed across runs and machines and no file is split between the two sets; the byte budgets
cap how much is read on interpreters with larger libraries. The model is a byte-level
GPT in nanoGPT's shape (token + learned position embeddings, pre-LN causal blocks, a final
LayerNorm, a linear head; Radford et al. 2019), small enough for a CPU.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from decoupled.lab.tasks._transformer import Block
from decoupled.lab.tasks.base import Hyperparameters, Task, TaskData

VALIDATION_SHARE = 20  # one file in 20 (5%) goes to validation, chosen by path hash
TRAIN_BYTES = 12_000_000  # caps on what is read, in bytes, to keep loading under a second
VALIDATION_BYTES = 600_000
# encodings/ holds generated codec tables that copy one another (cp858.py shares 99% of its
# lines with cp850.py): split by file, they put training text into validation
SKIPPED_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"
}  # fmt: skip
CONTEXT = 64  # bytes the model sees; windows are CONTEXT + 1 long (inputs and next bytes)
EVAL_WINDOWS = 128  # fixed validation windows: 128 × 64 = 8192 predicted bytes

# Loaded corpora by stdlib root: repeated runs in one process (a sweep) read the files once.
_CACHE: dict[str, TaskData] = {}


def stdlib_sources(root: str | Path) -> list[str]:
    """Relative paths (POSIX form, sorted) of the ``*.py`` files under ``root``, without test
    suites, installed packages and the generated codec tables (``SKIPPED_DIRS``)."""
    root = Path(root)
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]  # prune the walk in place
        found += [
            (Path(directory) / name).relative_to(root).as_posix()
            for name in files
            if name.endswith(".py")
        ]
    return sorted(found)


def is_validation_file(relative_path: str) -> bool:
    """Whether a file belongs to validation: a stable hash (not Python's salted ``hash``) of
    its relative path, so the split is the same in every process and on every machine."""
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % VALIDATION_SHARE == 0


def split_files(relative_paths: list[str]) -> tuple[list[str], list[str]]:
    """(train, validation) file lists, each in the given order."""
    train = [p for p in relative_paths if not is_validation_file(p)]
    validation = [p for p in relative_paths if is_validation_file(p)]
    return train, validation


def read_bytes(root: Path, relative_paths: list[str], budget: int) -> Tensor:
    """Concatenate files in order until ``budget`` bytes, as a uint8 tensor (a file that
    crosses the budget is cut there)."""
    chunks, total = [], 0
    for path in relative_paths:
        if total >= budget:
            break
        chunk = (root / path).read_bytes()[: budget - total]
        chunks.append(chunk)
        total += len(chunk)
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def stdlib_identity() -> str:
    """Which standard library the corpus is read from: its folder and Python's version."""
    return f"python {platform.python_version()} stdlib {sysconfig.get_paths()['stdlib']}"


def load_corpus(root: str | Path | None = None) -> TaskData:
    """Train and validation bytes of the standard library at ``root`` (default: this
    interpreter's), cached per root."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    key = str(root.resolve())
    if key not in _CACHE:
        train_files, validation_files = split_files(stdlib_sources(root))
        train = read_bytes(root, train_files, TRAIN_BYTES)
        validation = read_bytes(root, validation_files, VALIDATION_BYTES)
        if validation.numel() < CONTEXT + 1 or train.numel() < CONTEXT + 1:
            raise FileNotFoundError(f"Too little Python source under {root} for the charlm task")
        info = {"root": key, "train_files": len(train_files), "val_files": len(validation_files)}
        _CACHE[key] = TaskData({"train": train, "val": validation}, train.numel(), info)
    return _CACHE[key]


def evaluation_windows(validation: Tensor, count: int = EVAL_WINDOWS) -> Tensor:
    """``count`` evenly spaced validation windows of CONTEXT + 1 bytes, as int64 rows."""
    last_start = validation.numel() - (CONTEXT + 1)
    starts = torch.linspace(0, last_start, min(count, last_start + 1)).long()
    return torch.stack([validation[s : s + CONTEXT + 1] for s in starts.tolist()]).long()


class ByteGPT(nn.Module):
    """Byte embedding + learned positions → causal pre-LN blocks → LayerNorm → linear head.

    The head is untied from the embedding, so each is decayed (or not) on its own.
    """

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, context: int = CONTEXT):
        super().__init__()
        self.token_embedding = nn.Embedding(256, dim)
        self.position_embedding = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, causal=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.norm(self.blocks(x)))


def next_byte_loss(model: nn.Module, windows: Tensor) -> Tensor:
    """Mean cross-entropy (nats) of predicting each window's bytes 1..C from bytes 0..C-1."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


class CharLM(Task):
    """Byte-level language model of the Python standard library; metric: validation bits per
    byte (cross-entropy / ln 2) on 128 fixed windows of validation files.

    Budget: 1200 steps of 32 random windows of 64 bytes. How the defaults were chosen:
    docs/TUNING.md (charlm).
    """

    name = "charlm"
    description = "byte-level causal Transformer (2 blocks, dim 64) on the stdlib's source"
    metric = "val_bits_per_byte"
    batch_size = 32
    steps = 1200
    quick_steps = 120
    eval_every = 200
    defaults = {
        "adam": Hyperparameters(lr=1e-2, weight_decay=0.0),
        "adamw": Hyperparameters(lr=1e-2, weight_decay=1e-1),
        "sgd": Hyperparameters(lr=5e-1, weight_decay=0.0, momentum=0.9),
        "sgdw": Hyperparameters(lr=5e-1, weight_decay=1e-3, momentum=0.9),
    }

    def data_identity(self, data_dir: str | None = None) -> str | None:
        return stdlib_identity()

    def load(self, data_dir: str | None = None) -> TaskData:
        return load_corpus()

    def build_model(self) -> nn.Module:
        return ByteGPT()

    def batches(self, data: TaskData, generator: torch.Generator) -> Iterator[Tensor]:
        train = data["train"]
        offsets = torch.arange(CONTEXT + 1)
        while True:  # windows drawn uniformly; the corpus is far longer than any run reads
            starts = torch.randint(
                train.numel() - CONTEXT, (self.batch_size, 1), generator=generator
            )
            yield train[starts + offsets].long()

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        return next_byte_loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData) -> float:
        was_training = model.training
        model.eval()
        nats = next_byte_loss(model, evaluation_windows(data["val"])).item()
        model.train(was_training)
        return nats / math.log(2)
