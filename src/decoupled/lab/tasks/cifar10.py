"""CIFAR-10: a small ResNet with BatchNorm and the standard crop + flip augmentation.

The paper's headline experiment (Loshchilov & Hutter 2019, arXiv 1711.05101, section 4) is
CIFAR-10 with a ResNet. The lab never downloads: pass ``--data-dir`` pointing at the
extracted "CIFAR-10 python version" (``cifar-10-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html), i.e. the folder holding ``data_batch_1`` ..
``data_batch_5`` and ``test_batch``, or its parent. Each file is a pickled dict whose
``b"data"`` is an N×3072 uint8 array, each row the 1024 red, then green, then blue pixels of
a 32×32 image in row-major order, and whose ``b"labels"`` is a list of N ints in 0..9.

Images are kept as uint8 (150 MB for the training set instead of 600 MB as floats) and
normalized per batch. The budget is sized for a CPU and is far short of convergence; on a
GPU raise the step count.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from decoupled.lab.tasks.base import (
    ClassificationTask,
    Hyperparameters,
    TaskData,
    classification_error,
    shuffled_batches,
)

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBFOLDER = "cifar-10-batches-py"  # what the official archive extracts to
LABEL_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# Per-channel mean and standard deviation over all pixels of the 50000 training images, in
# [0, 1] units. (Some popular scripts use std (0.2023, 0.1994, 0.2010), which is not the
# pixel std of CIFAR-10; these are.)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PADDING = 4  # random crop of 32 from the image zero-padded by 4 pixels on each side


def find_cifar10(data_dir: str | Path | None) -> Path:
    """The folder holding the six batch files: ``data_dir`` itself or its SUBFOLDER."""
    if data_dir is None:
        raise FileNotFoundError(
            "The cifar10 task needs --data-dir: a folder with the CIFAR-10 python version "
            f"files ({', '.join(TRAIN_FILES)}, {TEST_FILE}); the lab does not download them"
        )
    root = Path(data_dir)
    folders = (root, root / SUBFOLDER)
    missing = {f: [n for n in (*TRAIN_FILES, TEST_FILE) if not (f / n).is_file()] for f in folders}
    for folder in folders:
        if not missing[folder]:
            return folder
    closest = min(folders, key=lambda folder: len(missing[folder]))  # root on a tie
    raise FileNotFoundError(
        f"CIFAR-10 files missing in {closest}: {', '.join(missing[closest])} (looked in {root} "
        f"and {root / SUBFOLDER}); extract cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html"
    )


def read_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One batch file -> (N, 3, 32, 32) uint8 images, (N,) int64 labels.

    The files are Python 2 pickles with bytes keys, hence ``encoding="bytes"``. Unpickling
    runs code from the file, so only read files you trust (as with any CIFAR loader).
    """
    try:
        with open(path, "rb") as file:
            batch = pickle.load(file, encoding="bytes")
        images, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (
        pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, IndexError,
        ValueError,  # e.g. a pickled ndarray indexed by bytes, ragged lists as b"data"
    ) as error:  # fmt: skip
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data' and "
            f"b'labels'): {type(error).__name__}: {error}"
        ) from error
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), got {images.dtype} of shape "
            f"{images.shape}"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: b'labels' must be {len(images)} integers, one per image, got "
            f"{labels.dtype} of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(LABEL_NAMES)):
        raise ValueError(
            f"{path}: labels must lie in 0..{len(LABEL_NAMES) - 1}, got "
            f"{labels.min()}..{labels.max()}"
        )
    images = images.reshape(-1, 3, 32, 32).copy()
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def write_fake_cifar10(
    directory: str | Path, n_train_per_batch: int = 10, n_test: int = 10, seed: int = 0
) -> Path:
    """Write tiny random CIFAR-10 files in the genuine format (for tests and docs).

    Same file names, pickle layout (bytes keys ``data``, ``labels``, ``batch_label``,
    ``filenames``; protocol 2, like the Python 2 originals) and ``batches.meta``. Returns
    ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index, name in enumerate((*TRAIN_FILES, TEST_FILE)):
        count = n_test if name == TEST_FILE else n_train_per_batch
        batch = {
            b"batch_label": f"fake batch {index + 1} of 6".encode(),
            b"labels": rng.integers(0, 10, size=count).tolist(),  # a list, as in the originals
            b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
            b"filenames": [f"fake_{index}_{i}.png".encode() for i in range(count)],
        }
        with open(directory / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
    meta = {b"label_names": [n.encode() for n in LABEL_NAMES], b"num_vis": 3072}
    with open(directory / "batches.meta", "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return directory


def normalize(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> float, standardized per channel with MEAN and STD."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random 32×32 crop of the zero-padded image and random horizontal flip, per image
    (the augmentation of He et al. 2016, arXiv 1512.03385, section 4.2), on uint8 images."""
    count, channels, height, width = images.shape
    padded = F.pad(images, (PADDING,) * 4)  # zero = black, as torchvision's RandomCrop pads
    # random numbers come from the (CPU) generator, so the crops do not depend on the device
    top = torch.randint(2 * PADDING + 1, (count,), generator=generator).to(images.device)
    left = torch.randint(2 * PADDING + 1, (count,), generator=generator).to(images.device)
    flip = (torch.rand(count, generator=generator) < 0.5).to(images.device)
    arange = partial(torch.arange, device=images.device)
    # crops[n, c, i, j] = padded[n, c, top[n] + i, left[n] + j], by broadcast indexing
    crops = padded[
        arange(count).view(-1, 1, 1, 1),
        arange(channels).view(1, -1, 1, 1),
        (top[:, None] + arange(height)).view(count, 1, height, 1),
        (left[:, None] + arange(width)).view(count, 1, 1, width),
    ]
    return torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)


class BasicBlock(nn.Module):
    """Two 3×3 conv + BN layers with an identity (or 1×1 conv) shortcut (He et al. 2016)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet (He et al. 2016, section 4.2) with one BasicBlock per stage: a 3×3
    stem of width 16 at 32×32, then widths 16, 32, 64 at 16×16, 8×8, 4×4 (every stage
    halves the resolution, unlike the paper's first one: a quarter of the compute, which a
    CPU budget needs), global average pooling, a linear head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, channels = [], widths[0]
        for width in widths:
            stages.append(BasicBlock(channels, width, stride=2))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, classes)

    def forward(self, images: Tensor) -> Tensor:
        features = self.stages(self.stem(images))
        return self.head(features.mean(dim=(2, 3)))


class CIFAR10(ClassificationTask):
    """CIFAR-10 (50000 train / 10000 test) from ``--data-dir``, small ResNet with BatchNorm,
    crop + flip augmentation; metric: test error on the 10000 test images.

    Budget: 500 steps of batch 128 (1.3 epochs), sized for a CPU; on a GPU raise it. How the
    defaults were chosen: docs/TUNING.md (cifar10).
    """

    name = "cifar10"
    description = "CIFAR-10 from --data-dir, small ResNet (3 BasicBlocks) with crop+flip"
    metric = "test_error"
    batch_size = 128
    steps = 500
    quick_steps = 20
    eval_every = 100
    needs_data_dir = True
    defaults = {
        "adam": Hyperparameters(lr=1e-3, weight_decay=5e-4),
        "adamw": Hyperparameters(lr=3e-3, weight_decay=1e-1),
        "sgd": Hyperparameters(lr=1e-1, weight_decay=5e-4, momentum=0.9),
        "sgdw": Hyperparameters(lr=1e-1, weight_decay=5e-3, momentum=0.9),
    }

    def data_identity(self, data_dir: str | None = None) -> str | None:
        """The batch files' absolute folder, sizes and modification times (cheap to read at
        every key; a file replaced or rewritten changes its time)."""
        try:
            folder = find_cifar10(data_dir).resolve()
        except FileNotFoundError:
            return None  # the run fails when it loads, and says why
        stats = [(folder / name).stat() for name in (*TRAIN_FILES, TEST_FILE)]
        return f"{folder} " + " ".join(f"{st.st_size}:{st.st_mtime_ns}" for st in stats)

    def load(self, data_dir: str | None = None) -> TaskData:
        folder = find_cifar10(data_dir)
        train = [read_batch(folder / name) for name in TRAIN_FILES]
        x_test, y_test = read_batch(folder / TEST_FILE)
        tensors = {
            "x_train": torch.cat([images for images, _ in train]),
            "y_train": torch.cat([labels for _, labels in train]),
            "x_test": x_test,
            "y_test": y_test,
        }
        info = {"classes": 10, "folder": str(folder), "label_names": LABEL_NAMES}
        return TaskData(tensors, train_size=tensors["x_train"].shape[0], info=info)

    def build_model(self) -> nn.Module:
        return ResNet()

    def batches(
        self, data: TaskData, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        batch_size = min(self.batch_size, data.train_size)  # lets tiny fake data sets work
        for images, labels in shuffled_batches(
            data["x_train"], data["y_train"], batch_size, generator
        ):
            yield normalize(augment(images, generator)), labels

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData) -> float:
        was_training = model.training
        model.eval()
        wrong = 0  # normalized chunk by chunk: a float copy of the test set would be 123 MB
        for start in range(0, data["x_test"].shape[0], 1000):
            inputs = normalize(data["x_test"][start : start + 1000])
            targets = data["y_test"][start : start + 1000]
            wrong += round(classification_error(model, inputs, targets) * len(targets))
        model.train(was_training)
        return wrong / data["x_test"].shape[0]
