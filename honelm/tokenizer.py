"""Tokenizer training and loading for honelm.

This module owns:

* `train_tokenizer`: train a new tokenizer from an iterator of texts, either a byte-level BPE
  (for decoders) or a WordPiece (for encoders), wrapped as a `PreTrainedTokenizerFast` so it
  saves with `save_pretrained` and reloads with a plain `AutoTokenizer.from_pretrained`.
* `load_tokenizer`: load an existing tokenizer (local directory or hub id) and make sure it
  has a pad token.
* `bytes_per_token_stats`: compression statistics for logs.

It deliberately knows nothing about models: callers pass the tokenizer's special token ids
to `honelm.models` themselves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from huggingface_hub import is_offline_mode
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from honelm.errors import ConfigError, HonelmError

logger = logging.getLogger(__name__)

__all__ = [
    "BPE_SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "WORDPIECE_SPECIAL_TOKENS",
    "bytes_per_token_stats",
    "load_tokenizer",
    "pad_from_eos",
    "train_tokenizer",
]

TOKENIZER_KINDS = ("bpe", "wordpiece")

# Byte-level BPE: one document separator doubling as BOS/EOS (GPT-2 convention) plus a
# dedicated pad token, so padding never collides with the EOS the model must learn to emit.
# No unk token: every byte has its own symbol, so nothing is ever unknown.
BPE_EOS = "<|endoftext|>"
BPE_PAD = "<|pad|>"
BPE_SPECIAL_TOKENS = (BPE_EOS, BPE_PAD)

# Order matters: trainers assign ids in this order, so [PAD] gets id 0, which is also
# BertConfig's default pad_token_id.
WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Byte-level BPE always contains the 256 byte symbols plus its special tokens; a smaller
# requested vocabulary cannot be honoured.
_BPE_MIN_VOCAB = 256 + len(BPE_SPECIAL_TOKENS)


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    # NFC (not NFD / accent stripping like BertNormalizer): NFD splits precomposed Hangul
    # syllables into jamo and strip_accents then mangles them, so Korean would tokenize
    # into garbage. NFC keeps syllables whole and is a no-op for already-NFC text, which is
    # what makes the BPE round trip exact.
    steps: list[normalizers.Normalizer] = [normalizers.NFC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)


def _build_bpe(vocab_size: int, min_frequency: int, lowercase: bool, show_progress: bool
               ) -> tuple[Tokenizer, trainers.Trainer]:
    if vocab_size < _BPE_MIN_VOCAB:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE tokenizer: it needs at "
            f"least {_BPE_MIN_VOCAB} (256 byte symbols + {len(BPE_SPECIAL_TOKENS)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    tok.normalizer = _normalizer(lowercase)
    # add_prefix_space=False: a leading space would be invented on decode and break the
    # exact round trip; the GPT-2 regex still splits words with their leading space attached.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # An explicit post-processor that adds nothing: no BOS/EOS on encode (packing inserts EOS
    # between documents itself), and having one stops transformers from installing its own.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        # The full byte alphabet, even for bytes absent from the corpus, so that any input
        # (unseen scripts, emoji) is encodable and no unk token is ever needed.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    return tok, trainer


def _build_wordpiece(vocab_size: int, min_frequency: int, lowercase: bool, show_progress: bool
                     ) -> tuple[Tokenizer, trainers.Trainer]:
    if vocab_size <= len(WORDPIECE_SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size={vocab_size} is too small for a WordPiece tokenizer")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = _normalizer(lowercase)
    # BERT-style split on whitespace and punctuation; Hangul is neither, so Korean words stay
    # whole here and WordPiece learns their subwords.
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    cls_id = WORDPIECE_SPECIAL_TOKENS.index("[CLS]")
    sep_id = WORDPIECE_SPECIAL_TOKENS.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(WORDPIECE_SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    return tok, trainer


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 8000,
    min_frequency: int = 2,
    lowercase: bool | None = None,
    model_max_length: int = 2048,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer from `texts` and wrap it as a `PreTrainedTokenizerFast`.

    kind="bpe": byte-level BPE for decoders. Special tokens `<|endoftext|>` (bos and eos) and
    `<|pad|>`; no unk token (every byte is in the vocabulary); nothing is added on encode.
    `decode(encode(x)) == x` for any NFC-normalized string.

    kind="wordpiece": WordPiece for encoders with `[PAD] [UNK] [CLS] [SEP] [MASK]` (ids 0-4),
    BERT pre-tokenization and a `[CLS] A [SEP] (B [SEP])` template with token_type_ids 0/1.

    `lowercase` defaults to False for both kinds: cased is the safe choice for non-Latin
    scripts (lowercasing buys nothing for Hangul and loses information for Latin text in mixed
    corpora); pass True to lowercase. The resulting vocabulary has at most `vocab_size` entries
    (fewer when the corpus is too small to learn that many).
    """
    if kind not in TOKENIZER_KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(TOKENIZER_KINDS)}")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be >= 1, got {min_frequency}")
    if model_max_length < 1:
        raise ConfigError(f"model_max_length must be >= 1, got {model_max_length}")
    lower = bool(lowercase) if lowercase is not None else False
    build = _build_bpe if kind == "bpe" else _build_wordpiece
    backend, trainer = build(vocab_size, min_frequency, lower, show_progress)

    # A length hint only helps the progress bar; generators have none, which is fine.
    length = len(texts) if hasattr(texts, "__len__") else None  # type: ignore[arg-type]
    backend.train_from_iterator(_checked_texts(texts), trainer=trainer, length=length)

    if kind == "bpe":
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=BPE_EOS,
            eos_token=BPE_EOS,
            pad_token=BPE_PAD,
            model_max_length=model_max_length,
            padding_side="right",
            # The backend already decodes the exact original spacing; the legacy cleanup would
            # drop spaces before punctuation and break the round trip.
            clean_up_tokenization_spaces=False,
        )
    else:
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            # token_type_ids are not returned by default in transformers 5; encoders need
            # them to tell the two segments of a pair apart.
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
            model_max_length=model_max_length,
            padding_side="right",
            # decoders.WordPiece(cleanup=True) already tidies spaces around punctuation.
            clean_up_tokenization_spaces=False,
        )
    # Special tokens were trained into the vocabulary, so wrapping must not have appended
    # new ones past vocab_size.
    if len(wrapped) > vocab_size:
        raise HonelmError(f"internal error: tokenizer has {len(wrapped)} tokens, more than vocab_size={vocab_size}")
    return wrapped


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    # The Rust trainer reports a non-string item with an opaque error; name the item instead.
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ConfigError(f"train_tokenizer: item {i} of texts is {type(text).__name__}, not str")
        yield text


def _looks_like_local_path(path_or_id: str | Path) -> bool:
    # Hub ids are "name" or "org/name"; anything else (Path objects, absolute or relative
    # paths with ./ ../ ~, backslashes, deeper nesting) can only be meant as a local path.
    if isinstance(path_or_id, Path):
        return True
    s = str(path_or_id)
    return (
        os.path.isabs(s)
        or s.startswith((".", "~"))
        or "\\" in s
        or s.count("/") > 1
        or s.endswith("/")
    )


def load_tokenizer(path_or_id: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or (when online) a hub id.

    A missing local path raises `HonelmError`. A string that is not an existing local path and
    looks like a hub id ("name" or "org/name") is tried on the hub; a failure (offline mode,
    unknown repo) is wrapped in `HonelmError`. If the tokenizer has no pad token, its eos token
    is used as pad (the usual choice for decoders) and a warning is logged; `pad_from_eos(tok)`
    tells afterwards whether that happened.
    """
    local = Path(str(path_or_id)).expanduser()
    if local.exists():
        if not local.is_dir():
            raise HonelmError(f"tokenizer path {str(local)!r} is a file; expected a directory saved with save_pretrained")
        try:
            tok = AutoTokenizer.from_pretrained(str(local))
        except (OSError, ValueError, KeyError) as err:
            raise HonelmError(f"could not load a tokenizer from directory {str(local)!r}: {err}") from err
    elif _looks_like_local_path(path_or_id):
        raise HonelmError(f"tokenizer directory {str(path_or_id)!r} does not exist")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(path_or_id))
        except Exception as err:  # hub errors come in many types; all mean "could not get it"
            hint = (
                "HF_HUB_OFFLINE is set, so hub ids only resolve from the local cache"
                if is_offline_mode()
                else "check the id, your network connection and access rights"
            )
            raise HonelmError(
                f"{str(path_or_id)!r} is not a local directory and could not be loaded as a hub id "
                f"(offline mode or not found: {hint}): {type(err).__name__}: {err}"
            ) from err

    if tok.pad_token is None:
        if tok.eos_token is not None:
            # Decoder tokenizers often ship without a pad token; padded positions are masked
            # out of attention and loss, so reusing eos is harmless there.
            tok.pad_token = tok.eos_token
            logger.warning("tokenizer %s has no pad token; using eos token %r as pad", path_or_id, tok.eos_token)
        else:
            logger.warning("tokenizer %s has neither a pad nor an eos token; batching with padding will fail",
                           path_or_id)
    return tok


def pad_from_eos(tok: PreTrainedTokenizerBase) -> bool:
    """Whether `tok` pads with its eos token because it was loaded without a pad token (`load_tokenizer`
    then sets eos as pad). A tokenizer saved with pad = eos names its pad token itself: False."""
    # init_kwargs are the arguments the tokenizer was constructed (loaded) with; setting pad_token later
    # does not change them
    return tok.pad_token is not None and tok.pad_token == tok.eos_token and tok.init_kwargs.get("pad_token") is None


def bytes_per_token_stats(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> dict[str, float]:
    """Compression statistics of `tokenizer` on `texts`, for logs.

    Counts exclude special tokens added by the post-processor. Returns texts, tokens, chars,
    bytes (UTF-8), chars_per_token, bytes_per_token, tokens_per_text and unk_rate (fraction of
    tokens that are the unk token; always 0 for byte-level BPE).
    """
    n_texts = n_tokens = n_chars = n_bytes = n_unk = 0
    unk_id = tokenizer.unk_token_id
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_texts += 1
        n_tokens += len(ids)
        n_chars += len(text)
        n_bytes += len(text.encode("utf-8"))
        if unk_id is not None:
            n_unk += sum(1 for i in ids if i == unk_id)
    per_token = max(n_tokens, 1)  # avoid dividing by zero on empty input
    return {
        "texts": n_texts,
        "tokens": n_tokens,
        "chars": n_chars,
        "bytes": n_bytes,
        "chars_per_token": n_chars / per_token,
        "bytes_per_token": n_bytes / per_token,
        "tokens_per_text": n_tokens / max(n_texts, 1),
        "unk_rate": n_unk / per_token,
    }
