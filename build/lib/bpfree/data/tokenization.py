"""A subword (BPE) vocabulary trained on a text set's training split, and pair encoding.

Why train one: the experiments train BERT-style encoders from scratch (no pre-trained
vocabulary exists offline), and a vocabulary fitted on the training split only keeps
the test split out of every fitted quantity. Hugging Face `tokenizers` does the work
(BERT's normaliser, pre-tokeniser and [CLS] a [SEP] b [SEP] template); the trained
tokenizer is saved as JSON beside the prepared splits and hashed in their manifest.

BPE rather than WordPiece: in tokenizers 0.23 the WordPiece trainer (and BPE with a "##"
continuation prefix) assigns ids in hash-map order, so two preparations of the same
split gave different vocabularies; plain BPE gave byte-identical ones (tested).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from bpfree.data.errors import DataError

TOKENIZER_NAME = "tokenizer.json"
VOCAB_SIZE = 8192
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID = 0  # [PAD] is the first special token


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    if tokenizer.token_to_id("[PAD]") != PAD_ID:
        raise DataError("the trained tokenizer does not map [PAD] to id 0")
    return tokenizer


def load_tokenizer(path: Path | str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"cannot read the tokenizer {path} ({error}); prepare the dataset again") from None


def encode_examples(tokenizer, examples: list[dict], text_fields: list[str], max_len: int) -> torch.Tensor:
    """(N, 3, T) int64: token ids, segment ids, attention mask, stacked so a trainer can slice
    one tensor per split; T is the longest encoding, at most max_len (longer pairs are
    truncated, the longer sentence first)."""
    if not examples:
        return torch.zeros((0, 3, 1), dtype=torch.long)
    if len(text_fields) not in (1, 2):
        raise DataError(f"can encode one sentence or a pair, got text fields {text_fields}")
    tokenizer = tokenizer.__class__.from_str(tokenizer.to_str())  # leave the caller's settings alone
    tokenizer.enable_truncation(max_len, strategy="longest_first")
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")
    inputs = [tuple(example[field] for field in text_fields) for example in examples]
    if len(text_fields) == 1:
        inputs = [pair[0] for pair in inputs]
    encodings = tokenizer.encode_batch(inputs)
    return torch.stack([
        torch.tensor([e.ids for e in encodings], dtype=torch.long),
        torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
        torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
    ], dim=1)
