"""Training frameworks: Hugging Face ``transformers.Trainer`` (``optimizers=(opt, scheduler)``)
and PyTorch Lightning (``configure_optimizers``) run ``decoupled.AdamW`` for a few steps.

Optional extras (``pip install "decoupled[hf]"`` / ``"decoupled[lightning]"``); each test is
skipped, saying which package is missing, when its extra is not installed. Nothing is
downloaded: the BERT is built from a tiny config with random weights.
"""

from __future__ import annotations

import pytest
import torch

import decoupled


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """A safety net: these tests must never download (huggingface_hub reads this on import,
    which happens inside the tests)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


STEPS = 3


class _TokenDataset(torch.utils.data.Dataset):
    """Random token sequences with binary labels, as ``Trainer``'s default collator wants."""

    def __init__(self, size: int = 16, length: int = 8, vocab_size: int = 50):
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, vocab_size, (size, length), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        ids = self.input_ids[index]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": self.labels[index],
        }


def _tiny_bert():
    transformers = pytest.importorskip(
        "transformers", reason="Hugging Face integration needs the 'hf' extra (transformers)"
    )
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return transformers, transformers.BertForSequenceClassification(config)


def test_param_groups_exempts_layernorm_and_bias_of_a_hugging_face_model():
    transformers, model = _tiny_bert()
    groups, summary = decoupled.param_groups(model, 0.01, return_summary=True, verbose=False)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    not_decayed = set(summary.no_decay_names)
    assert {names[id(p)] for p in groups[1]["params"]} == not_decayed
    assert not_decayed == {n for n in names.values() if n.endswith(".bias") or ".LayerNorm." in n}
    assert {
        "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.0.attention.output.LayerNorm.weight",
        "bert.encoder.layer.0.output.LayerNorm.bias",
        "classifier.bias",
    } <= not_decayed
    assert {"bert.embeddings.word_embeddings.weight", "classifier.weight"} <= decayed
    # The same split as Trainer's own default optimizer makes.
    trainer_rule = transformers.Trainer.get_decay_parameter_names(None, model)
    assert decayed == set(trainer_rule)


def test_hugging_face_trainer_runs_decoupled_adamw(tmp_path):
    transformers, model = _tiny_bert()
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate ('hf' extra)")
    optimizer = decoupled.AdamW(decoupled.param_groups(model, 0.01, verbose=False), lr=1e-3)
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=1, num_training_steps=STEPS
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    before = model.classifier.weight.detach().clone()
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_TokenDataset(),
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    assert trainer.state.global_step == STEPS
    # Trainer (through accelerate) wraps the optimizer it was given, and steps that one.
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer
    assert not torch.equal(model.classifier.weight, before)
    assert optimizer.state[model.classifier.weight]["step"] == STEPS
    assert [group["decay_steps"] for group in optimizer.param_groups] == [STEPS, STEPS]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # inside lightning 2.6 with torch 2.13
def test_lightning_configure_optimizers_runs_decoupled_adamw(tmp_path):
    lightning = pytest.importorskip(
        "lightning", reason="Lightning integration needs the 'lightning' extra (lightning)"
    )

    class Regressor(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(6, 16),
                torch.nn.LayerNorm(16),
                torch.nn.Tanh(),
                torch.nn.Linear(16, 1),
            )

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return torch.nn.functional.mse_loss(self.net(inputs), targets)

        def configure_optimizers(self):
            optimizer = decoupled.AdamW(decoupled.param_groups(self, 0.05, verbose=False), lr=1e-2)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randn(32, 1))
    module = Regressor()
    trainer = lightning.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, decoupled.AdamW)
    assert trainer.global_step == STEPS
    assert optimizer.state[module.net[0].weight]["step"] == STEPS
    # The per-step scheduler ran: the cosine schedule has reached its end (lr 0).
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _training_args(transformers, tmp_path, **overrides):
    options = {
        "output_dir": str(tmp_path),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "disable_tqdm": True,
        **overrides,
    }
    return transformers.TrainingArguments(**options)


def test_hugging_face_optimizer_cls_and_kwargs_builds_decoupled_adamw(tmp_path):
    """``optimizer_cls_and_kwargs``: the Trainer builds our class over its own two groups,
    whose λ is ``TrainingArguments.weight_decay``: a ``weight_decay`` in the kwargs is
    overruled by the groups (the Trainer sets it on both), and ``params`` replaces them."""
    transformers, model = _tiny_bert()
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate ('hf' extra)")
    args = _training_args(transformers, tmp_path, weight_decay=0.01)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_TokenDataset(),
        optimizer_cls_and_kwargs=(decoupled.AdamW, {"lr": 1e-3, "weight_decay": 0.5}),
    )
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer) is decoupled.AdamW
    assert optimizer.state[model.classifier.weight]["step"] == STEPS
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    ours = decoupled.param_groups(model, 0.01, verbose=False)
    assert [{id(p) for p in g["params"]} for g in optimizer.param_groups] == [
        {id(p) for p in g["params"]} for g in ours
    ]
    # Our own groups instead: "params" in the kwargs replaces the Trainer's split.
    _, model = _tiny_bert()
    groups = decoupled.param_groups(model, 0.05, exclude_embeddings=True, verbose=False)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_TokenDataset(),
        optimizer_cls_and_kwargs=(decoupled.AdamW, {"params": groups, "lr": 1e-3}),
    )
    trainer.create_optimizer()
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05, 0.0]
    assert (
        model.bert.embeddings.word_embeddings.weight in trainer.optimizer.param_groups[1]["params"]
    )


def test_hugging_face_split_differs_from_param_groups_on_other_norms_and_1d_tensors():
    """Trainer exempts biases, nn.LayerNorm and names with "norm"/"layernorm"; param_groups
    also exempts every other norm layer (BatchNorm, GroupNorm) and every 1-D tensor."""
    transformers = pytest.importorskip("transformers", reason="needs the 'hf' extra")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.bn = torch.nn.BatchNorm1d(4)
            self.group = torch.nn.GroupNorm(2, 4)
            self.ln = torch.nn.LayerNorm(4)
            self.gain = torch.nn.Parameter(torch.ones(4))  # a LayerScale-like 1-D gain

    model = Net()
    trainer_decays = set(transformers.Trainer.get_decay_parameter_names(None, model))
    ours = {n for n, decay in decoupled.optim.groups.decay_mask(model).items() if decay}
    assert ours == {"linear.weight"}
    assert trainer_decays - ours == {"bn.weight", "group.weight", "gain"}
    assert ours <= trainer_decays


@pytest.mark.parametrize("every_n_steps", [0, -1])
@pytest.mark.parametrize("framework", ["transformers", "lightning"])
def test_callbacks_refuse_a_logging_interval_below_one(framework, every_n_steps):
    pytest.importorskip(framework, reason=f"needs {framework} (the 'hf' / 'lightning' extra)")
    if framework == "transformers":
        from decoupled.integrations.huggingface import DecayMonitorCallback

        make = lambda: DecayMonitorCallback(None, every_n_steps=every_n_steps)  # noqa: E731
    else:
        from decoupled.integrations.lightning import DecayMonitorCallback

        make = lambda: DecayMonitorCallback(every_n_steps=every_n_steps)  # noqa: E731
    message = rf"Invalid every_n_steps value: {every_n_steps} \(must be an integer >= 1\)"
    with pytest.raises(ValueError, match=message):
        make()


def test_hugging_face_callback_logs_the_monitor_to_tensorboard(tmp_path):
    transformers, model = _tiny_bert()
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate ('hf' extra)")
    pytest.importorskip("tensorboard", reason="needs the 'tensorboard' extra")
    from decoupled.integrations import read_scalars
    from decoupled.integrations.huggingface import DecayMonitorCallback

    from .test_tensorboard import assert_matches_table

    args = _training_args(
        transformers, tmp_path, max_steps=4, report_to=["tensorboard"], weight_decay=0.01
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_TokenDataset(),
        optimizer_cls_and_kwargs=(decoupled.AdamW, {"lr": 1e-3}),
    )
    callback = DecayMonitorCallback(trainer, every_n_steps=2)
    trainer.add_callback(callback)
    trainer.train()
    table = callback.monitor.table
    assert sorted(set(table.column("step"))) == [2, 4]
    # the Trainer's TensorBoardCallback prefixes "train/" and logs at the global step
    assert_matches_table(read_scalars(tmp_path, prefix="train/"), table)
    logged = [entry for entry in trainer.state.log_history if "decay_model/lr" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]


def test_hugging_face_callback_refuses_an_unsupported_optimizer(tmp_path):
    transformers, model = _tiny_bert()
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate ('hf' extra)")
    from decoupled.integrations.huggingface import DecayMonitorCallback

    trainer = transformers.Trainer(
        model=model,
        args=_training_args(transformers, tmp_path),
        train_dataset=_TokenDataset(),
        optimizer_cls_and_kwargs=(torch.optim.RMSprop, {"lr": 1e-3}),
    )
    trainer.add_callback(DecayMonitorCallback(trainer))
    with pytest.raises(TypeError, match=r"support Adam, AdamW, SGD and SGDW .*not RMSprop"):
        trainer.train()


def _lightning_regressor(lightning):
    class Regressor(lightning.LightningModule):
        """No configure_optimizers: LightningCLI's --optimizer supplies it."""

        def __init__(self, width: int = 16):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(6, width),
                torch.nn.LayerNorm(width),
                torch.nn.Tanh(),
                torch.nn.Linear(width, 1),
            )

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return torch.nn.functional.mse_loss(self.net(inputs), targets)

        def train_dataloader(self):
            generator = torch.Generator().manual_seed(0)
            inputs, targets = torch.randn(32, 6, generator=generator), torch.randn(32, 1)
            data = torch.utils.data.TensorDataset(inputs, targets)
            return torch.utils.data.DataLoader(data, batch_size=8)

    return Regressor


_QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def test_lightning_instantiates_decoupled_adamw_from_its_class_path():
    """What LightningCLI does with a parsed ``--optimizer decoupled.AdamW`` (runs without
    jsonargparse, which the full command line below needs)."""
    pytest.importorskip("lightning", reason="needs the 'lightning' extra")
    from lightning.pytorch.cli import instantiate_class

    model = torch.nn.Linear(3, 2)
    init = {"class_path": "decoupled.AdamW", "init_args": {"lr": 0.01, "weight_decay": 0.05}}
    optimizer = instantiate_class(model.parameters(), init)
    assert type(optimizer) is decoupled.AdamW
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0.05


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # inside lightning 2.6 with torch 2.13
def test_lightning_cli_selects_decoupled_adamw_by_class_path(tmp_path, monkeypatch):
    lightning = pytest.importorskip("lightning", reason="needs the 'lightning' extra")
    monkeypatch.setattr("sys.argv", ["train.py"])  # args= replaces the command line
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    torch.manual_seed(0)
    cli = LightningCLI(
        _lightning_regressor(lightning),
        run=False,
        save_config_callback=None,
        args=[
            "--optimizer=decoupled.AdamW",
            "--optimizer.lr=0.01",
            "--optimizer.weight_decay=0.05",
            f"--trainer.max_steps={STEPS}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            *(f"--trainer.{key}={str(value).lower()}" for key, value in _QUIET.items()),
        ],
    )
    cli.trainer.fit(cli.model)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is decoupled.AdamW
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.state[cli.model.net[0].weight]["step"] == STEPS


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # inside lightning 2.6 with torch 2.13
def test_lightning_callback_logs_the_monitor_to_tensorboard(tmp_path):
    lightning = pytest.importorskip("lightning", reason="needs the 'lightning' extra")
    pytest.importorskip("tensorboard", reason="needs the 'tensorboard' extra")
    from lightning.pytorch.loggers import TensorBoardLogger

    from decoupled.integrations import read_scalars
    from decoupled.integrations.lightning import DecayMonitorCallback

    from .test_tensorboard import assert_matches_table

    class Module(_lightning_regressor(lightning)):
        def configure_optimizers(self):
            return decoupled.create_optimizer(self, "adamw", lr=1e-2, weight_decay=0.05)

    torch.manual_seed(0)
    module, callback = Module(), DecayMonitorCallback(every_n_steps=2)
    trainer = lightning.Trainer(
        max_steps=4,
        logger=TensorBoardLogger(str(tmp_path), name="run"),
        callbacks=[callback],
        default_root_dir=str(tmp_path),
        **_QUIET,
    )
    trainer.fit(module)
    table = callback.monitor.table
    assert sorted(set(table.column("step"))) == [2, 4]
    assert_matches_table(read_scalars(tmp_path), table)


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # inside lightning 2.6 with torch 2.13
def test_lightning_callback_refuses_an_unsupported_optimizer(tmp_path):
    lightning = pytest.importorskip("lightning", reason="needs the 'lightning' extra")
    from decoupled.integrations.lightning import DecayMonitorCallback

    class Module(_lightning_regressor(lightning)):
        def configure_optimizers(self):
            return torch.optim.Adagrad(self.parameters())

    trainer = lightning.Trainer(
        max_steps=1, logger=False, callbacks=[DecayMonitorCallback()], **_QUIET
    )
    with pytest.raises(TypeError, match=r"support Adam, AdamW, SGD and SGDW .*not Adagrad"):
        trainer.fit(Module())
