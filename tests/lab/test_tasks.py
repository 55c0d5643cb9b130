"""Every registered task: data, model, batches, a few AdamW steps, evaluation; then the
task-specific checks (CIFAR-10's file format, CharLM's split by file)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

import decoupled
from decoupled.lab.tasks import Hyperparameters, get_task, task_names
from decoupled.lab.tasks.base import TaskData

# optional modules a task needs (its extra); the task is skipped when they are missing
NEEDS = {"mnist1d": "mnist1d", "digits": "sklearn", "vit": "sklearn", "minilm": "transformers"}
# the range each metric must fall in, for any model (untrained ones included)
METRIC_RANGES = {
    "test_error": (0.0, 1.0),
    "val_bits_per_byte": (0.0, 16.0),
    "mlm_loss": (0.0, 20.0),
}


@pytest.fixture(scope="module")
def fake_cifar_dir(tmp_path_factory):
    from decoupled.lab.tasks.cifar10 import write_fake_cifar10

    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"), 8, 6, seed=0)


_LOADED: dict[str, tuple] = {}


@pytest.fixture(params=task_names())
def loaded(request, fake_cifar_dir):
    """(task, data) for each registered task, loaded once per test session."""
    name = request.param
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    if name not in _LOADED:
        task = get_task(name)
        _LOADED[name] = (task, task.load(str(fake_cifar_dir) if task.needs_data_dir else None))
    return _LOADED[name]


def test_declarations(loaded):
    task, data = loaded
    assert task.metric in METRIC_RANGES
    assert 0 < task.quick_steps < task.steps and 0 < task.eval_every <= task.steps
    assert set(task.defaults) == {"adam", "adamw", "sgd", "sgdw", "adamw-cautious", "sgdw-cautious"}
    # cautious weight decay adds no hyperparameter: AdamW's and SGDW's tuned values
    assert task.defaults["adamw-cautious"] == task.defaults["adamw"]
    assert task.defaults["sgdw-cautious"] == task.defaults["sgdw"]
    for optimizer, hyper in task.defaults.items():
        assert isinstance(hyper, Hyperparameters) and hyper.lr > 0 and hyper.weight_decay >= 0
        assert hyper.momentum == (0.9 if optimizer.startswith("sgd") else 0.0)
    assert isinstance(data, TaskData) and data.train_size > 0


def test_same_seed_same_batches(loaded):
    task, data = loaded
    first = task.batches(data, torch.Generator().manual_seed(3))
    second = task.batches(data, torch.Generator().manual_seed(3))
    other = task.batches(data, torch.Generator().manual_seed(4))
    for _ in range(2):
        a, b, c = next(first), next(second), next(other)
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))
    flat_c = torch.utils._pytree.tree_leaves(c)
    assert not all(torch.equal(x, y) for x, y in zip(flat_a, flat_c, strict=True))


def test_model_is_seeded(loaded):
    task, _ = loaded
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(task.build_model())
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_adamw_steps_reduce_the_loss_and_evaluate(loaded):
    task, data = loaded
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = decoupled.AdamW(decoupled.param_groups(model, 0.01, verbose=False), lr=1e-3)
    batch = next(task.batches(data, torch.Generator().manual_seed(0)))
    model.train()
    losses = []
    for _ in range(6):  # fitting one batch: the loss must fall
        loss = task.loss(model, batch)
        assert torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    metric = task.evaluate(model, data)
    low, high = METRIC_RANGES[task.metric]
    assert isinstance(metric, float) and math.isfinite(metric) and low <= metric <= high
    assert model.training  # evaluation restores the training mode
    assert task.evaluate(model, data) == metric  # a fixed held-out set


# ---- CIFAR-10: the genuine file format --------------------------------------------------


def test_cifar10_reads_the_genuine_format(fake_cifar_dir):
    task = get_task("cifar10")
    data = task.load(str(fake_cifar_dir))
    assert data["x_train"].shape == (5 * 8, 3, 32, 32) and data["x_train"].dtype == torch.uint8
    assert data["x_test"].shape == (6, 3, 32, 32) and data.train_size == 40

    with open(fake_cifar_dir / "data_batch_2", "rb") as file:
        raw = pickle.load(file, encoding="bytes")
    assert data["y_train"][8:16].tolist() == raw[b"labels"]
    # a row is 1024 red, 1024 green, then 1024 blue values, each image row-major
    channel, row, column = 2, 5, 7
    expected = raw[b"data"][3][channel * 1024 + row * 32 + column]
    assert data["x_train"][8 + 3, channel, row, column].item() == expected


def test_runs_on_replaced_data_files_get_other_store_keys(tmp_path):
    """The key holds the files' folder, sizes and times: results on the old files are not
    reused for new ones behind the same --data-dir, nor for the same relative path
    elsewhere; rereading unchanged files gives the same key."""
    import os

    from decoupled.lab.tasks.cifar10 import TEST_FILE, write_fake_cifar10
    from decoupled.lab.train import RunSpec

    write_fake_cifar10(tmp_path / "a", 4, 4, seed=0)
    spec = RunSpec("cifar10", "adamw", 1e-3, 0.1, seed=0, steps=5, data_dir=str(tmp_path / "a"))
    key = spec.key()
    assert spec.key() == key
    test_file = tmp_path / "a" / TEST_FILE
    stat = test_file.stat()
    write_fake_cifar10(tmp_path / "a", 4, 4, seed=7)  # same sizes: only the time tells
    os.utime(test_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert spec.key() != key
    write_fake_cifar10(tmp_path / "b", 4, 4, seed=0)
    assert RunSpec(**{**spec.__dict__, "data_dir": str(tmp_path / "b")}).key() != key


def test_stdlib_tasks_key_their_runs_by_the_interpreters_library():
    import platform

    from decoupled.lab.train import RunSpec

    for name in ("charlm", "minilm"):
        config = RunSpec(name, "adamw", 1e-3, 0.1, seed=0, steps=5).config()
        assert platform.python_version() in config["data"]
    assert "data" not in RunSpec("mnist1d", "adamw", 1e-3, 0.1, seed=0, steps=5).config()


def test_cifar10_accepts_the_archive_folder(tmp_path):
    from decoupled.lab.tasks.cifar10 import write_fake_cifar10

    write_fake_cifar10(tmp_path / "cifar-10-batches-py", 2, 2, seed=1)
    assert get_task("cifar10").load(str(tmp_path)).train_size == 10


def test_cifar10_missing_files_are_named(tmp_path):
    task = get_task("cifar10")
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*test_batch") as error:
        task.load(str(tmp_path))
    assert str(tmp_path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="data-dir"):
        task.load(None)


def test_cifar10_names_only_the_files_missing_in_the_fuller_folder(tmp_path):
    from decoupled.lab.tasks.cifar10 import write_fake_cifar10

    (write_fake_cifar10(tmp_path / "cifar-10-batches-py", 2, 2) / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing in .*cifar-10-batches-py: test_batch \("):
        get_task("cifar10").load(str(tmp_path))


def _rewrite(path, change):
    with open(path, "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    change(batch)
    with open(path, "wb") as file:
        pickle.dump(batch, file, protocol=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update({b"labels": b[b"labels"][:3]}), r"b'labels' must be 4 integers"),
        (lambda b: b.update({b"labels": [57] * 4}), r"labels must lie in 0\.\.9, got 57\.\.57"),
        (lambda b: b.update({b"labels": [-1] * 4}), r"labels must lie in 0\.\.9, got -1"),
        (lambda b: b.update({b"data": b[b"data"] / 255}), r"b'data' must be uint8 .* float64"),
        (lambda b: b.update({b"data": b[b"data"][:, :3000]}), r"shape \(4, 3000\)"),
        (lambda b: b.update({b"fine_labels": b.pop(b"labels")}), r"not a CIFAR-10 python batch"),
    ],
)
def test_cifar10_refuses_malformed_batches_naming_the_file(tmp_path, change, message):
    from decoupled.lab.tasks.cifar10 import write_fake_cifar10

    write_fake_cifar10(tmp_path, 4, 4)
    _rewrite(tmp_path / "data_batch_3", change)
    with pytest.raises(ValueError, match=message) as error:
        get_task("cifar10").load(str(tmp_path))
    assert "data_batch_3" in str(error.value)


@pytest.mark.parametrize(
    "content",
    [np.zeros((4, 3072), np.uint8), {b"data": [[1, 2], [3]], b"labels": [0, 1]}],
    ids=["an-array-not-a-dict", "ragged-data"],
)
def test_cifar10_refuses_other_pickles_naming_the_file(tmp_path, content):
    from decoupled.lab.tasks.cifar10 import write_fake_cifar10

    write_fake_cifar10(tmp_path, 4, 4)
    with open(tmp_path / "data_batch_2", "wb") as file:
        pickle.dump(content, file, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_2 is not a CIFAR-10 python batch"):
        get_task("cifar10").load(str(tmp_path))


def test_cifar10_refuses_a_truncated_file(tmp_path):
    from decoupled.lab.tasks.cifar10 import write_fake_cifar10

    write_fake_cifar10(tmp_path, 4, 4)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR-10 python batch"):
        get_task("cifar10").load(str(tmp_path))


def test_cifar10_augmentation_is_a_padded_crop_or_its_mirror():
    from decoupled.lab.tasks.cifar10 import PADDING, augment

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (PADDING,) * 4)
    for n in range(4):
        windows = [
            padded[n, :, i : i + 32, j : j + 32]
            for i in range(2 * PADDING + 1)
            for j in range(2 * PADDING + 1)
        ]
        assert any(torch.equal(out[n], w) or torch.equal(out[n], w.flip(-1)) for w in windows)


# ---- CharLM: the split is by file and fixed ---------------------------------------------


def test_charlm_split_is_by_file_and_deterministic():
    from decoupled.lab.tasks import charlm

    data = charlm.load_corpus()
    files = charlm.stdlib_sources(data.info["root"])
    train, validation = charlm.split_files(files)
    assert charlm.split_files(files) == (train, validation)
    assert set(train).isdisjoint(validation) and sorted(train + validation) == files
    assert 0.01 < len(validation) / len(files) < 0.15
    assert not any("site-packages" in path or "/test/" in f"/{path}" for path in files)
    # generated codec tables copy one another (cp858.py ~ cp850.py): none on either side
    assert not any(path.startswith("encodings/") for path in files)
    # validation bytes start with the whole first validation file (no file is split)
    first = (charlm.Path(data.info["root"]) / validation[0]).read_bytes()
    assert bytes(data["val"][: len(first)].tolist()) == first
    assert charlm.load_corpus() is data  # cached for repeated runs in one process


def test_charlm_validation_windows_are_fixed():
    from decoupled.lab.tasks import charlm

    val = charlm.load_corpus()["val"]
    windows = charlm.evaluation_windows(val)
    assert windows.shape == (charlm.EVAL_WINDOWS, charlm.CONTEXT + 1)
    assert torch.equal(windows, charlm.evaluation_windows(val))


# ---- MNIST-1D: generated, deterministic, and harmless to the caller's random state ------


def test_mnist1d_is_deterministic_and_keeps_global_random_state():
    np = pytest.importorskip("numpy")
    pytest.importorskip("mnist1d")
    import random

    from decoupled.lab.tasks.mnist1d import make_mnist1d

    np.random.seed(7)
    random.seed(7)
    first = make_mnist1d()
    assert np.random.randint(1 << 30) == np.random.RandomState(7).randint(1 << 30)
    assert random.random() == random.Random(7).random()
    second = make_mnist1d()
    assert first["x"].shape == (4000, 40) and first["x_test"].shape == (1000, 40)
    for key in ("x", "y", "x_test", "y_test"):
        assert np.array_equal(first[key], second[key])


# ---- MiniLM: nothing held out is trained on -----------------------------------------------


def test_minilm_trains_on_no_held_out_docstring_and_draws_epochs_without_repeats():
    """asyncio/transports.py (held out) and sslproto.py (trained on) share docstrings: the
    copies are dropped from training. Batches go through epochs without repeats."""
    import sysconfig
    from pathlib import Path

    pytest.importorskip("transformers")
    from decoupled.lab.tasks.minilm import collect_docstrings

    train, validation = collect_docstrings(Path(sysconfig.get_paths()["stdlib"]))
    assert validation and not set(train) & set(validation)
    task = get_task("minilm")
    data = task.load()
    batches = task.batches(data, torch.Generator().manual_seed(0))
    per_epoch = data["train"].shape[0] // task.batch_size
    seen = [next(batches) for _ in range(min(per_epoch, 40))]
    rows = {tuple(row.tolist()) for masked, labels in seen for row in torch.where(
        labels == -100, masked, labels)}  # fmt: skip
    assert len(rows) == len(seen) * task.batch_size  # no sequence twice within the epoch


@pytest.mark.parametrize("name", task_names())
def test_each_task_points_to_its_tuning_notes(name):
    """A task's docstring says what it is and points to docs/TUNING.md, which has a section
    for it (the tuning logs live there, not in the code)."""
    from importlib.util import find_spec
    from pathlib import Path

    import decoupled.lab.tasks as tasks

    module_name, class_name = tasks._REGISTRY[name].split(":")
    source = Path(find_spec(module_name).origin).read_text()  # no optional import needed
    docstring = source.split(f"class {class_name}(", 1)[1].split('"""')[1]
    assert f"docs/TUNING.md ({name})" in " ".join(docstring.split())
    tuning = Path(__file__).parents[2] / "docs" / "TUNING.md"
    assert f"\n## {name}\n" in tuning.read_text()
