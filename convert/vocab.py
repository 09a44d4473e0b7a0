"""The tokenizer as GGUF wants it: gpt2 BPE with pre-tokenizer ``lfm2``, one token per embedding row.

Upstream's converter finds the pre-tokenizer by hashing a probe text's ids; a tokenizer it
has not seen (our test tokenizers) would fail there. LFM2 tokenizers all split as ``lfm2``
(Llama-3 regex, byte-level, ignore_merges), so we write it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from lfm2edge.convert.checkpoint import read_tokenizer
from lfm2edge.runtime.core.errors import CheckpointError

PRE_TOKENIZER = "lfm2"


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]
    special: gguf.SpecialVocab  # merges, BOS/EOS/PAD ids, add_bos/add_eos


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<") and token.endswith(">"))


def load_vocab(checkpoint_dir: Path, vocab_size: int) -> Vocab:
    """Tokens and types for ``vocab_size`` rows; ids the tokenizer lacks become UNUSED placeholders."""
    tok = read_tokenizer(checkpoint_dir / "tokenizer.json")
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise CheckpointError(
            f"the tokenizer has {len(vocab)} tokens but the embedding table only {vocab_size} rows: "
            "tokenizer.json and config.json do not belong together"
        )
    if any(i >= vocab_size for i in vocab.values()):
        raise CheckpointError(
            f"tokenizer.json has token ids up to {max(vocab.values())} but config.json's vocab_size is {vocab_size}: "
            "they do not belong together"
        )
    added = tok.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            token = added[i]
            tokens.append(token.content)
            looks = token.special or _looks_special(token.content)
            types.append(gguf.TokenType.CONTROL if looks else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    if len(set(tokens)) != len(tokens):  # llama.cpp aborts on a vocabulary with a token twice
        raise CheckpointError(f"{checkpoint_dir / 'tokenizer.json'} gives two ids the same token text")
    try:
        special = gguf.SpecialVocab(checkpoint_dir, load_merges=True, n_vocab=vocab_size)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OSError) as e:
        raise CheckpointError(
            f"cannot read the merges and special tokens of {checkpoint_dir} (tokenizer.json, tokenizer_config.json, "
            f"special_tokens_map.json): {e}"
        ) from None
    if not special.merges:
        raise CheckpointError(f"{checkpoint_dir / 'tokenizer.json'} has no BPE merges; LFM2's tokenizer needs them")
    return Vocab(tokens, types, special)


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    vocab.special.add_to_gguf(writer)
