"""Corpus → byte-level BPE tokenizer → one memory-mapped token file → packed training sequences.

* A corpus is a plain or gzip text file (`.gz` by suffix); every non-empty line is a document, and
  the tokenizer's end-of-text token (`EOT`, also its BOS and pad) follows each document, so a
  model sees `EOT` at the start of every document and BLiMP's `bos=auto` scores the first word.
* `tokenize_corpora` encodes the corpora once into `tokens.bin` (uint16, or uint32 above 65,536
  ids) with `tokens.json` beside it: one segment per corpus and the hashes that must match for the
  file to be reused.
* `TokenData` holds the split: the last `val_fraction` of every corpus's segment is the validation
  slice, the rest is training text. Packed sequences are non-overlapping windows of `seq_len + 1`
  tokens (inputs and next-token targets) laid end to end inside one part of one segment, so no
  training window touches a validation token.
* `batch_offsets(seed, step)` is the data order: sample `s = step * batch_size + j` is window
  `perm_e[s mod n]` with `perm_e` a permutation seeded by (seed, epoch `e = s // n`). It is a pure
  function of (seed, step), so a resumed run replays exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
from typing import Any, Iterator, Sequence

import numpy as np

from lmgrad import io as lio

EOT = "<|endoftext|>"
TOKENS = "tokens.bin"
TOKENS_META = "tokens.json"


class CorpusError(ValueError):
    """A corpus is missing, empty or too small for the requested sequences."""


def check_corpora(paths: Sequence[str]) -> list[pathlib.Path]:
    """The corpus paths, each checked to exist (the error names the path)."""
    if not paths:
        raise CorpusError("no corpus given: pass one or more text files (plain or .gz) as `corpus`")
    out = []
    for p in paths:
        path = pathlib.Path(os.path.expanduser(p))
        if not path.is_file():
            raise CorpusError(f"corpus file not found: {p} (the `corpus` option: plain or .gz text files; "
                              "the configs build the paths from $LMGRAD_CORPORA_DIR)")
        out.append(path)
    return out


def iter_documents(path: str | os.PathLike, max_bytes: int | None = None) -> Iterator[str]:
    """Non-empty lines of a plain or gzip text file (stripped), up to about `max_bytes` of text."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    seen = 0
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line
                seen += len(line) + 1
                if max_bytes is not None and seen >= max_bytes:
                    return


def train_tokenizer(paths: Sequence[str | os.PathLike], vocab_size: int, *, max_bytes: int | None = None) -> Any:
    """A byte-level BPE (`tokenizers`) trained on the corpora, as a `PreTrainedTokenizerFast`.

    Byte-level: every string encodes, no unknown tokens. `EOT` is id 0 and serves as BOS, EOS and
    pad. `max_bytes` bounds the text read per corpus (the first bytes of each).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts() -> Iterator[str]:
        for p in paths:
            yield from iter_documents(p, max_bytes)

    tok.train_from_iterator(texts(), trainer=trainer)
    if tok.get_vocab_size() < 257:
        raise CorpusError(f"tokenizer vocabulary of {tok.get_vocab_size()} is below the 256 bytes + {EOT}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=None, model_max_length=1 << 30)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize_corpora(tokenizer: Any, paths: Sequence[str | os.PathLike], directory: str | os.PathLike, *,
                     fingerprint: dict[str, Any], batch_docs: int = 4096,
                     max_bytes: int | None = None) -> dict[str, Any]:
    """Encodes every corpus once into `directory/tokens.bin` (written to a temporary name, then
    renamed) and returns the metadata also written to `tokens.json`. A file whose metadata has the
    same `fingerprint` (corpus and tokenizer hashes) is reused as it is."""
    directory = pathlib.Path(directory)
    meta_path, bin_path = directory / TOKENS_META, directory / TOKENS
    if meta_path.exists() and bin_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint and bin_path.stat().st_size == meta["n_tokens"] * np.dtype(
                meta["dtype"]).itemsize:
            return meta
    directory.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(len(tokenizer))
    eot = tokenizer.convert_tokens_to_ids(EOT)
    backend = tokenizer.backend_tokenizer
    tmp = directory / (TOKENS + ".tmp")
    segments = []
    n = 0
    with open(tmp, "wb") as f:
        for p in paths:
            start = n
            buf: list[str] = []

            def flush() -> int:
                encs = backend.encode_batch(buf, add_special_tokens=False)
                ids = np.fromiter((i for e in encs for i in (*e.ids, eot)), dtype=dtype)
                f.write(ids.tobytes())
                buf.clear()
                return len(ids)

            for doc in iter_documents(p, max_bytes):
                buf.append(doc)
                if len(buf) >= batch_docs:
                    n += flush()
            if buf:
                n += flush()
            segments.append({"corpus": str(p), "start": start, "end": n})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, bin_path)
    meta = {"n_tokens": n, "dtype": dtype.name, "eot_id": int(eot), "segments": segments,
            "fingerprint": fingerprint}
    lio.write_json(meta_path, meta)
    return meta


@dataclasses.dataclass
class TokenData:
    """A memory-mapped token file split into packed training and validation windows.

    Attributes:
      tokens: the token stream (memory-mapped, read-only).
      seq_len: model input length; a window is `seq_len + 1` tokens.
      train_offsets / val_offsets: int64 start offsets of the windows of each part.
      parts: per corpus, its training and validation token ranges.
    """

    tokens: np.ndarray
    seq_len: int
    train_offsets: np.ndarray
    val_offsets: np.ndarray
    parts: list[dict[str, Any]]

    @classmethod
    def open(cls, directory: str | os.PathLike, seq_len: int, val_fraction: float) -> "TokenData":
        directory = pathlib.Path(directory)
        meta = json.loads((directory / TOKENS_META).read_text())
        tokens = np.memmap(directory / TOKENS, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
        return cls.from_tokens(tokens, meta["segments"], seq_len, val_fraction)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, segments: Sequence[dict[str, Any]], seq_len: int,
                    val_fraction: float) -> "TokenData":
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        w = seq_len + 1
        train, val, parts = [], [], []
        for seg in segments:
            start, end = int(seg["start"]), int(seg["end"])
            n_val = int(round((end - start) * val_fraction))
            split = end - n_val
            n_train_w, n_val_w = (split - start) // w, n_val // w
            if n_train_w < 1 or n_val_w < 1:
                raise CorpusError(
                    f"{seg['corpus']}: {end - start} tokens are too few for one training and one validation "
                    f"sequence of {w} tokens with val_fraction={val_fraction} (training part {split - start}, "
                    f"validation part {n_val} tokens); use a larger corpus or a smaller seq_len")
            train.append(start + w * np.arange(n_train_w, dtype=np.int64))
            val.append(split + w * np.arange(n_val_w, dtype=np.int64))
            parts.append({"corpus": seg["corpus"], "train": [start, split], "val": [split, end],
                          "train_sequences": n_train_w, "val_sequences": n_val_w})
        return cls(tokens, seq_len, np.concatenate(train), np.concatenate(val), parts)

    def windows(self, offsets: np.ndarray) -> np.ndarray:
        """int32 [B, seq_len + 1]: the windows starting at `offsets`."""
        w = self.seq_len + 1
        return np.stack([np.asarray(self.tokens[o:o + w], dtype=np.int32) for o in offsets])

    def batch_offsets(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """Offsets of training batch `step` (0-based): a pure function of (seed, step, batch_size)."""
        n = len(self.train_offsets)
        s = step * batch_size + np.arange(batch_size, dtype=np.int64)
        epochs, pos = s // n, s % n
        out = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            perm = epoch_permutation(seed, int(e), n)
            sel = epochs == e
            out[sel] = self.train_offsets[perm[pos[sel]]]
        return out

    def batch(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """int32 [batch_size, seq_len + 1]: training batch `step`."""
        return self.windows(self.batch_offsets(seed, step, batch_size))

    def val_batches(self, batch_size: int, max_sequences: int | None = None) -> Iterator[np.ndarray]:
        """The validation windows in order (the first `max_sequences`, spread over corpora by
        taking every k-th window), in batches of at most `batch_size`."""
        offsets = self.val_offsets
        if max_sequences is not None and len(offsets) > max_sequences:
            idx = np.linspace(0, len(offsets) - 1, max_sequences).round().astype(np.int64)
            offsets = offsets[idx]
        for i in range(0, len(offsets), batch_size):
            yield self.windows(offsets[i:i + batch_size])


_PERMS: dict[tuple[int, int, int], np.ndarray] = {}


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the `n` training windows in `epoch` (cached; seeded by (seed, epoch))."""
    key = (seed, epoch, n)
    if key not in _PERMS:
        if len(_PERMS) > 4:
            _PERMS.clear()
        _PERMS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMS[key]
