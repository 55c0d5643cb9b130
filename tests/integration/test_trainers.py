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
