"""Digits: scikit-learn's bundled 8×8 handwritten digits, a small 2-D CNN without normalization.

The data are the UCI "Optical Recognition of Handwritten Digits" test set (1797 images of
8×8 pixels with values 0–16), shipped inside scikit-learn (``sklearn.datasets.load_digits``),
so nothing is downloaded. The model has no normalization layers on purpose: here, unlike in
the BatchNorm tasks, an L2 penalty really shrinks the function the network computes rather
than only its effective learning rate (van Laarhoven 2017, arXiv 1706.05350), so the lab has
one task of each kind.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from decoupled.lab.tasks.base import ClassificationTask, Hyperparameters, TaskData

TEST_SIZE = 450  # 1347 train / 450 test: train_test_split's default 25% test share
SPLIT_SEED = 0  # random_state of the stratified split: fixed, so every run sees the same data


def load_digits_split() -> TaskData:
    """The digits as (N, 8, 8) float images in [0, 1], split 1347/450, stratified by class.

    Shared with the `vit` task, which trains a different model on the same split.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # an optional dependency of the lab
        raise ImportError(
            'The digits and vit tasks need scikit-learn: pip install "decoupled[lab]"'
        ) from error
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # pixels are 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_index, test_index = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=TEST_SIZE,
        stratify=digits.target,
        random_state=SPLIT_SEED,
    )
    train_index, test_index = torch.as_tensor(train_index), torch.as_tensor(test_index)
    tensors = {
        "x_train": images[train_index],
        "y_train": labels[train_index],
        "x_test": images[test_index],
        "y_test": labels[test_index],
    }
    return TaskData(tensors, train_size=len(train_index), info={"classes": 10})


class DigitsCNN(nn.Module):
    """conv 16 → conv 32 → 2×2 max-pool → linear 64 → linear 10, ReLU between, no norm."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8×8 -> 4×4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes)
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images.unsqueeze(1)))


class Digits(ClassificationTask):
    """8×8 digits (1347 train / 450 test), small 2-D CNN; metric: test error.

    Budget: 1500 steps of batch 64. How the defaults were chosen: docs/TUNING.md (digits).
    """

    name = "digits"
    description = "scikit-learn 8×8 digits (1347/450 split), small 2-D CNN without normalization"
    metric = "test_error"
    batch_size = 64
    steps = 1500
    quick_steps = 150
    eval_every = 250
    defaults = {
        "adam": Hyperparameters(lr=1e-3, weight_decay=1e-4),
        "adamw": Hyperparameters(lr=1e-3, weight_decay=1e-2),
        "sgd": Hyperparameters(lr=3e-2, weight_decay=5e-4, momentum=0.9),
        "sgdw": Hyperparameters(lr=3e-2, weight_decay=5e-3, momentum=0.9),
    }

    def load(self, data_dir: str | None = None) -> TaskData:
        return load_digits_split()

    def build_model(self) -> nn.Module:
        return DigitsCNN()
