"""The chars example: a small causal character Transformer trained with AdamW on text from a deterministic
synthetic grammar (offline, the same text on every machine), ``configs/chars.yaml``:

    batchlab study -c configs/chars.yaml --quick

``CharsData`` cuts the text into sequences of ``seq_len + 1`` characters (inputs and next-character targets);
``CharTransformer`` logs ``val/loss``, the mean cross-entropy per character in nats. The grammar's sentences
("the big cat sees a fox.") choose a few words at random each, so the loss has a floor well above 0 that a
short run approaches: about 0.5 nats per character, against ln(28) = 3.3 for a uniform guess.
"""

from __future__ import annotations

import functools
import random

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from batchlab.errors import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, check, check_arguments
from batchlab.examples.splits import SplitData

ALPHABET = " .abcdefghijklmnopqrstuvwxyz"
_WORDS = {
    "det": ["the", "a", "my", "one"],
    "adj": ["red", "big", "old", "small", "happy"],
    "noun": ["cat", "dog", "bird", "fish", "fox", "cow"],
    "verb": ["sees", "likes", "eats", "finds", "chases"],
}


def grammar_text(n_chars: int, seed: int) -> str:
    """At least ``n_chars`` characters of sentences ``det [adj] noun verb det [adj] noun.``, from ``seed``."""
    rng = random.Random(seed)  # Mersenne Twister: the same text from every Python version

    def phrase() -> list[str]:
        adj = [rng.choice(_WORDS["adj"])] if rng.random() < 0.5 else []
        return [rng.choice(_WORDS["det"]), *adj, rng.choice(_WORDS["noun"])]

    parts, length = [], 0
    while length < n_chars:
        sentence = " ".join([*phrase(), rng.choice(_WORDS["verb"]), *phrase()]) + ". "
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)


@functools.lru_cache(maxsize=4)
def grammar_windows(n_sequences: int, seq_len: int, seed: int) -> Tensor:
    """The text as ``(n_sequences, seq_len + 1)`` indices into ``ALPHABET``; kept, since a study builds the data
    anew for every one of its fits."""
    n = n_sequences * (seq_len + 1)
    text = grammar_text(n, seed)[:n].encode("ascii")
    codes = text.translate(bytes.maketrans(ALPHABET.encode("ascii"), bytes(range(len(ALPHABET)))))
    return torch.frombuffer(bytearray(codes), dtype=torch.uint8).long().view(n_sequences, seq_len + 1)


class CharsData(SplitData):
    """``n_sequences`` non-overlapping windows of the grammar's text as ``(input, target)`` character indices, the
    target the input shifted by one.

    Args:
        batch_size: Training sequences per batch on each device; read each time the training loader is built.
        n_sequences: Sequences in all, training and validation.
        seq_len: Characters per sequence (the model's context).
        val_fraction: Fraction of the sequences held out for validation.
        data_seed: Seed of the text and the split, separate from the training seed.
    """

    def __init__(self, batch_size: PositiveInt = 32, n_sequences: PositiveInt = 4000, seq_len: PositiveInt = 32,
                 val_fraction: Fraction = 0.1, data_seed: int = 0) -> None:
        super().__init__()
        check_arguments(CharsData.__init__, locals())
        check(round(n_sequences * val_fraction) >= 1 and round(n_sequences * val_fraction) < n_sequences,
              f"n_sequences={n_sequences} with val_fraction={val_fraction} leaves no training or no validation "
              "sequence: use more sequences or another fraction")
        self.save_hyperparameters()
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        hp = self.hparams
        windows = grammar_windows(hp.n_sequences, hp.seq_len, hp.data_seed)
        perm = torch.randperm(hp.n_sequences, generator=torch.Generator().manual_seed(hp.data_seed + 1))
        n_val = round(hp.n_sequences * hp.val_fraction)
        val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
        self.splits = {name: (windows[idx, :-1].contiguous(), windows[idx, 1:].contiguous())
                       for name, idx in (("train", train), ("val", val))}


class Block(nn.Module):
    """A pre-norm Transformer block: causal multi-head self-attention, then a 4x wide GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(LightningModule):
    """Token and position embeddings, ``layers`` causal Transformer blocks, a final layer norm and a linear head
    over the alphabet, trained on the next character's cross-entropy with AdamW.

    Args:
        seq_len: Longest context, the data's ``seq_len``.
        width: Embedding width (a multiple of ``heads``).
        layers: Transformer blocks.
        heads: Attention heads per block.
        lr: AdamW's learning rate; read when the optimizer is built (the study sets it).
        weight_decay: AdamW's decoupled weight decay.
    """

    def __init__(self, seq_len: PositiveInt = 32, width: PositiveInt = 64, layers: PositiveInt = 2,
                 heads: PositiveInt = 4, lr: PositiveFloat = 3e-3, weight_decay: NonNegativeFloat = 0.01) -> None:
        super().__init__()
        check_arguments(CharTransformer.__init__, locals())
        check(width % heads == 0, f"width={width} is not allowed with heads={heads}: use a multiple of heads")
        self.save_hyperparameters()
        self.tokens, self.positions = nn.Embedding(len(ALPHABET), width), nn.Embedding(seq_len, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, len(ALPHABET))

    def forward(self, codes: Tensor) -> Tensor:
        x = self.tokens(codes) + self.positions(torch.arange(codes.shape[1], device=codes.device))
        return self.head(self.norm(self.blocks(x)))

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        codes, targets = batch
        return F.cross_entropy(self(codes).flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=len(batch[0]), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
