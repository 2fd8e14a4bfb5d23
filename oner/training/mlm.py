"""Masked language modelling on the training side: WordPiece whole-word masking and BERT's head.

The `mlm` term (see `oner.objectives`) scores the head's predictions of the masked caption words
from the joint [image; masked caption] pass of [`oner.training.pretrainer.OneRPretrainer`].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def subword_table(tokenizer) -> torch.Tensor:
    """`(vocab,)` bool: True for WordPiece continuation pieces (`##...`), which belong to the previous word."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    for token, index in vocab.items():
        if token.startswith("##"):
            table[index] = True
    return table


def whole_word_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    is_subword: torch.Tensor,
    mask_token_id: int,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every piece of randomly chosen WORDS by [MASK] (BERT's whole-word masking).

    Each word is masked with `probability`; every caption gets at least one masked word, so every
    row contributes to the loss. Masked pieces become [MASK] (no 80/10/10 split: the first
    author's augmentation masks with [MASK] only [code, inferred]).

    Args:
        input_ids, attention_mask: `(batch, length)`.
        is_subword: `(vocab,)` bool from [`subword_table`].

    Returns:
        `masked_ids` `(batch, length)` and `labels` `(batch, length)`: the original id where masked, -100 elsewhere.
    """
    real = attention_mask.bool()
    starts = real & ~is_subword.to(input_ids.device)[input_ids]
    starts[:, 0] |= real[:, 0]  # a caption that begins with a ## piece still begins a word
    word_index = torch.cumsum(starts.long(), dim=1) - 1  # word of each token, -1 before the first
    n_words = int(starts.sum(dim=1).max())
    draws = torch.rand(input_ids.shape[0], max(n_words, 1), device=input_ids.device)
    chosen = draws < probability
    # At least one word per caption: the word with the smallest draw among the real words.
    words_per_row = starts.sum(dim=1)
    valid_word = torch.arange(chosen.shape[1], device=input_ids.device)[None] < words_per_row[:, None]
    first = torch.where(valid_word, draws, torch.full_like(draws, 2.0)).argmin(dim=1)
    chosen[torch.arange(len(chosen), device=input_ids.device), first] = True
    chosen &= valid_word
    masked = real & torch.gather(chosen, 1, word_index.clamp(min=0)) & (word_index >= 0)
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    masked_ids = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return masked_ids, labels


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder tied to the token embedding.

    Lives on the training side only; it is not saved with the model folder.
    """

    def __init__(self, hidden_size: int, token_embedding: nn.Embedding, eps: float = 1e-6):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.token_embedding = token_embedding  # tied: no extra vocab-sized matrix
        self.bias = nn.Parameter(torch.zeros(token_embedding.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(n, hidden)` -> `(n, vocab)` logits."""
        return self.norm(F.gelu(self.dense(hidden))) @ self.token_embedding.weight.t() + self.bias
