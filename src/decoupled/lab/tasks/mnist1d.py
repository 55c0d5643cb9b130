"""MNIST-1D: the default task, a small 1-D CNN with BatchNorm on Greydanus's MNIST-1D.

MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024,
arXiv 2011.14439) turns ten 1-D digit templates into 40-sample signals with random padding,
translation, shear, scaling and correlated noise. It is generated, not downloaded: the
`mnist1d` package's ``make_dataset(get_dataset_args())`` builds the standard 4000/1000
split from the fixed seed 42 in a fraction of a second, so the task works offline and
every run sees exactly the same data. A CNN reaches a few percent test error, an MLP about
30%, which leaves room for optimizer settings to matter.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from decoupled.lab.tasks.base import ClassificationTask, Hyperparameters, TaskData

# The package's standard arguments fix the data: 5000 signals of length 40, seed 42.
DATASET_SEED = 42


def make_mnist1d() -> dict[str, np.ndarray]:
    """The standard MNIST-1D split (x: 4000×40, x_test: 1000×40), generated offline.

    ``make_dataset`` reseeds numpy's and Python's global generators (``set_seed(args.seed)``);
    their states are restored afterwards so that loading data never changes a caller's
    random stream.
    """
    import random

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:  # an optional dependency of the lab
        raise ImportError(
            'The mnist1d task needs the mnist1d package: pip install "decoupled[lab]"'
        ) from error
    args = get_dataset_args()
    args.seed = DATASET_SEED  # explicit, so a change of the package's default cannot move it
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        return make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class MNIST1DNet(nn.Module):
    """Three 32-channel conv + BatchNorm + ReLU layers, then a linear head on the flat map.

    Flattening (rather than global pooling) keeps where a feature occurred, which MNIST-1D's
    templates need: a digit is defined by the order of its bumps along the signal.
    """

    def __init__(self, channels: int = 32, length: int = 40, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, kernel_size=5, padding=2, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels * (length // 4), classes)

    def forward(self, signals: Tensor) -> Tensor:
        return self.head(self.features(signals.unsqueeze(1)).flatten(1))


class MNIST1D(ClassificationTask):
    """MNIST-1D classification, 1-D CNN with BatchNorm; metric: test error (1000 signals).

    Budget: 3000 steps of batch 128. How the defaults were tuned: docs/TUNING.md (mnist1d).
    """

    name = "mnist1d"
    description = "MNIST-1D (4000 generated 1-D signals), 3-layer 1-D CNN with BatchNorm"
    metric = "test_error"
    higher_is_better = False
    batch_size = 128
    steps = 3000
    quick_steps = 300
    eval_every = 250
    defaults = {
        "adam": Hyperparameters(lr=3e-3, weight_decay=1e-2),
        "adamw": Hyperparameters(lr=1e-2, weight_decay=1.0),
        "sgd": Hyperparameters(lr=1e-1, weight_decay=5e-3, momentum=0.9),
        "sgdw": Hyperparameters(lr=1e-1, weight_decay=5e-2, momentum=0.9),
    }

    def load(self, data_dir: str | None = None) -> TaskData:
        arrays = make_mnist1d()
        tensors = {
            "x_train": torch.as_tensor(arrays["x"], dtype=torch.float32),
            "y_train": torch.as_tensor(arrays["y"], dtype=torch.long),
            "x_test": torch.as_tensor(arrays["x_test"], dtype=torch.float32),
            "y_test": torch.as_tensor(arrays["y_test"], dtype=torch.long),
        }
        return TaskData(tensors, train_size=tensors["x_train"].shape[0], info={"classes": 10})

    def build_model(self) -> nn.Module:
        return MNIST1DNet()
