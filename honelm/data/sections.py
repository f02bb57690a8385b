"""The data side of each training stage's config: its `data` section (and adapt's `adapt` options).

Every section extends `honelm.data.sources.SplitDataConfig` (where the data comes from and how it
is split) with the fields its stage reads: documents for language modelling (`TextDataConfig`,
`AdaptDataConfig`), labelled examples (`LabelledDataConfig`), conversations (`ChatDataConfig`,
read and split by `chat_splits`) and preference pairs (`PreferenceDataConfig`,
`RewardDataConfig`). The stage configs in `honelm.stages` put them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Sequence

from honelm.bounds import at_least, between
from honelm.data.sft import ChatDocument, SFTExamples, encode_conversations, split_conversations
from honelm.data.sources import SplitDataConfig, check_not_empty, report_skipped, say_split, skipping


@dataclass
class TextDataConfig(SplitDataConfig):
    """Text corpus for language modelling, its documents, and the block length."""

    unit: Literal["lines", "paragraphs", "files"] = "lines"
    """How plain-text files become documents: one per non-empty line, per blank-line-separated paragraph, or per file."""
    text_field: str = "text"
    """Field holding the text in JSONL/JSON/CSV/TSV/Parquet files."""
    block_size: Annotated[int, at_least(2)] = 256
    """Tokens per training block (documents are packed, separated by EOS)."""
    memmap: Literal["auto", "on", "off"] = "auto"
    """Corpora larger than memory (docs/corpus.md): on = split while streaming the files and train from a cached memory-mapped token file; off = read the corpus into memory; auto = on when the data.train files reach data.memmap_threshold_mb (a validation file or an hf: dataset keeps it off)."""
    memmap_threshold_mb: Annotated[float, at_least(0)] = 200.0
    """data.memmap=auto: corpus size (MB of data.train files) from which the memory-mapped path is used."""
    tokenize_workers: Annotated[int, at_least(0)] = 0
    """Worker processes that tokenise a corpus into its token file (data.memmap); 0 = one per CPU core, at most 8."""
    near_dup_sample: Annotated[int, at_least(1)] = 20000
    """data.memmap: near duplicates across splits are searched in this many documents (those with the smallest content hashes: a sample fixed by content); exact duplicates in every document."""
    cache_dir: str = ""
    """Where token files are cached (data.memmap); empty = $HONELM_CACHE_DIR, else $XDG_CACHE_HOME/honelm, else ~/.cache/honelm (entries under corpus/; delete it to clear)."""


@dataclass
class AdaptDataConfig(TextDataConfig):
    """The domain corpus (DAPT, and the pool curated TAPT picks from) and how text becomes rows."""

    train: str = ""
    """Domain corpus for DAPT: files, directories or globs (comma-separated); empty = no domain text (TAPT only)."""
    block_size: Annotated[int, at_least(2)] = 256
    """Longest row in tokens: packed blocks are this long; in documents mode longer documents are truncated (counted)."""
    pack: Literal["auto", "blocks", "documents"] = "auto"
    """Masked LM rows: blocks = documents packed as [CLS] d1 [SEP] d2 [SEP]... (RoBERTa FULL-SENTENCES); documents = one per row, truncated (the DSP reference's TAPT --line_by_line); auto = documents when all training text comes from the task (TAPT, curated TAPT), blocks when the domain corpus trains (DAPT). Decoders always pack."""


@dataclass
class AdaptOptions:
    """Task-text options and masking."""

    task_extra: str = ""
    """Extra unlabelled task text (files/globs, comma-separated; read like data.train with task.text_field): added to TAPT after the leak guard."""
    task_guard_only: bool = False
    """DAPT with a leak guard: task.* names the labelled task only so that domain text equal to one of its validation/test texts is excluded; its train text is not added to the corpus (boost's DAPT variant sets this)."""
    val_fraction: Annotated[float, between(0, 1, open_hi=True)] = 0.1
    """Share of the TAPT texts (task train + task_extra), chosen by content hash, held out to validate; 0 = none."""
    mlm_probability: Annotated[float, between(0, 1, open_lo=True, open_hi=True)] = 0.15
    """Share of real tokens selected for masked LM (of those 80% -> mask, 10% -> random token, 10% kept)."""


@dataclass
class LabelledDataConfig(SplitDataConfig):
    """Labelled examples: which fields hold the text, the optional second text, and the label."""

    text_field: str = "text"
    """Field (column) holding the text."""
    pair_field: str = ""
    """Field holding a second text for pair tasks (entailment, similarity); empty = single texts."""
    label_field: str = "label"
    """Field holding the label (class name or integer; a number for regression)."""
    task: Literal["classification", "regression"] = "classification"
    """classification (one label per example) or regression (one real-valued output)."""
    max_length: Annotated[int, at_least(1)] = 128
    """Longest input in tokens; longer inputs are truncated and the count is logged."""


@dataclass
class DistillDataConfig(LabelledDataConfig):
    """The task's labelled data (split exactly as `classify` splits it) and extra unlabelled transfer text."""

    task: Literal["classification", "regression", "generation"] = "classification"
    """classification or regression (labelled examples: a teacher classifier/regressor), or generation (conversations: a teacher causal LM; docs/distill.md)."""
    format: Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt"] = "auto"
    """Generation only: the conversations' row format, as `sft`'s data.format."""
    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Generation only: tokens that carry the loss, as `sft`'s data.train_on."""
    packing: bool = True
    """Generation only: pack several examples per row, as `sft`'s data.packing."""
    unlabelled: str = ""
    """Unlabelled text for the transfer set (files/globs, comma-separated; read with data.text_field / data.pair_field, no label): a domain corpus or more task-like text. Texts equal to a task validation/test text are dropped and counted."""


@dataclass
class ChatDataConfig(SplitDataConfig):
    """Conversations for instruction tuning: their format, length, which tokens train, packing."""

    format: Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt"] = "auto"
    """Row format; auto detects it per row: alpaca (instruction, input?, output), prompt_completion (prompt, completion), messages ([{role, content}]) or sharegpt (conversations: [{from, value}])."""
    max_length: Annotated[int, at_least(2)] = 512
    """Longest example in tokens (and the length of a packed row); longer ones keep their start and are counted; one whose every reply starts after it is dropped and counted (file:line in the log)."""
    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Tokens that carry the loss: every assistant turn with its end-of-turn EOS (assistant), only the final assistant turn (last), or every token (all)."""
    packing: bool = True
    """Pack several examples per row (best-fit decreasing; position_ids restart per example, no attention across examples); false = one right-padded example per row, batches grouped by length."""


def chat_splits(data: ChatDataConfig, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
    """Conversations split by content and seed (`honelm.data.sft.split_conversations`), the split said."""
    bad = skipping(data)
    splits = split_conversations(data, say, leak_texts, bad)
    report_skipped(bad, splits.manifest, say)
    say_split(splits.manifest, say)
    check_not_empty(splits.manifest, data)
    return splits


def encode_chat_split(tokenizer: Any, docs: Sequence[ChatDocument], data: ChatDataConfig) -> SFTExamples:
    """One split's conversations encoded as `data` says (length, trained tokens); file:line kept for the notes."""
    return encode_conversations(tokenizer, [d.conversation for d in docs], data.max_length, data.train_on,
                                where=[(d.source, d.line) for d in docs])


@dataclass
class PreferenceDataConfig(SplitDataConfig):
    """Preference pairs: {prompt, chosen, rejected} (strings or message lists), ShareGPT {conversations, chosen, rejected} rows, or {chosen, rejected} as whole dialogues sharing their prompt (hh-rlhf text or message lists); for dpo.loss=kto also unpaired {prompt, completion, label} rows. Splits group rows by prompt."""

    max_length: Annotated[int, at_least(2)] = 512
    """Longest prompt + reply in tokens (chat template included): the prompt's oldest turns go first (trim_turns), then the end is cut; pairs left with no reply token are dropped. All counted in the log."""
    trim_turns: bool = True
    """When a reply does not fit in max_length, drop the prompt's oldest user/assistant exchanges (the system message and the last user turn stay) until it fits; counted in the log. false = cut the end instead."""
    drop_truncated: bool = False
    """Also drop pairs whose chosen or rejected reply is cut by max_length (a cut reply changes its score); counted in the log."""


@dataclass
class RewardDataConfig(PreferenceDataConfig):
    """Preference pairs for the reward model, and where a per-pair margin comes from."""

    margin_field: str = "margin"
    """Field holding a per-pair margin m (loss -log σ(r_c - r_r - m)); used when the data has it (then every row needs it); empty = ignore it."""
