"""Corpus preparation: read text, clean it, deduplicate it, tokenize it into memory-mapped shards.

    read (.txt / .jsonl / .parquet) -> NFKC -> quality filters -> exact + near-duplicate removal
        -> tokenize (documents end with EOS) -> train/val shards (.npy, uint16 or uint32) + manifest.json

Generated task text (`--from-tasks N`, the speedrun's pretraining data) joins after the cleaning
stages: it is clean by construction, is mostly digits and symbols (the symbol filter would drop it)
and is templated (near-duplicate removal would drop most of it). Every output is written into a
temporary directory that replaces `--out` only when everything succeeded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanoseek.config import parse_overrides
from nanoseek.errors import DataError
from nanoseek.io import atomic_directory, atomic_write_text
from nanoseek.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
TXT_UNITS = ("paragraph", "line", "file")
MAX_REPORTED_BAD_LINES = 20


@dataclass
class CleaningConfig:
    """Quality filters and deduplication settings (CLI: `--filter key=value ...`)."""

    normalize: bool = True  # Unicode NFKC, \r\n -> \n, strip
    min_chars: int = 32
    max_chars: int = 1_000_000
    max_symbol_ratio: float = 0.3  # share of characters that are neither letters, digits nor spaces
    max_repeated_line_fraction: float = 0.3  # share of non-empty lines that repeat an earlier line
    exact_dedup: bool = True
    near_dedup_threshold: float | None = 0.8  # MinHash-estimated Jaccard similarity; None disables
    shingle_chars: int = 5  # character n-grams: works for English and for Chinese, which has no spaces
    num_perm: int = 128


@dataclass
class ReadStatistics:
    """What reading the input files saw; skipped bad lines keep their file:line for the manifest."""

    documents: int = 0
    bad_lines: int = 0
    bad_line_examples: list[str] = field(default_factory=list)
    per_file: dict[str, int] = field(default_factory=dict)

    def bad_line(self, location: str, skip: bool) -> None:
        if not skip:
            raise DataError(f"{location} (use --skip-bad-lines to skip such lines)")
        self.bad_lines += 1
        if len(self.bad_line_examples) < MAX_REPORTED_BAD_LINES:
            self.bad_line_examples.append(location)


# --------------------------------------------------------------------------------------------- reading
def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def _decoded_lines(path: Path, stats: ReadStatistics, skip_bad_lines: bool) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a line with invalid bytes is an error or is skipped."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                stats.bad_line(
                    f"{path}:{number}: not valid UTF-8 (byte {raw[error.start]:#04x})", skip_bad_lines
                )


def _read_txt(path: Path, unit: str, stats: ReadStatistics, skip_bad_lines: bool) -> Iterator[str]:
    if unit == "line":
        for _, line in _decoded_lines(path, stats, skip_bad_lines):
            if line.strip():
                yield line
        return
    buffer: list[str] = []
    for _, line in _decoded_lines(path, stats, skip_bad_lines):
        if unit == "paragraph" and not line.strip():
            if buffer:
                yield "".join(buffer)
            buffer = []
        else:
            buffer.append(line)
    if buffer:
        yield "".join(buffer)


def _read_jsonl(path: Path, text_field: str, stats: ReadStatistics, skip_bad_lines: bool) -> Iterator[str]:
    for number, line in _decoded_lines(path, stats, skip_bad_lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            stats.bad_line(
                f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})", skip_bad_lines
            )
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.bad_line(f"{path}:{number}: no string field {text_field!r}", skip_bad_lines)
            continue
        yield text


def _read_parquet(path: Path, text_field: str, stats: ReadStatistics, skip_bad_lines: bool) -> Iterator[str]:
    """Rows of one column, streamed in record batches. pyarrow directly rather than
    `datasets.load_dataset`, which spends seconds per call on a local file and writes a cache."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read as parquet: {error}") from error
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)}); set --text-field")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                stats.bad_line(f"{path}:row {row}: {text_field!r} is {text!r}, not a string", skip_bad_lines)
                continue
            yield text


def read_documents(
    inputs: Sequence[str | Path],
    text_field: str = "text",
    txt_unit: str = "paragraph",
    skip_bad_lines: bool = False,
    stats: ReadStatistics | None = None,
) -> Iterator[str]:
    """Documents of .txt (split by `txt_unit`), .jsonl (`text_field` of each line) and .parquet files.

    Missing and empty files, unknown suffixes, invalid UTF-8 and malformed JSON raise DataError with
    the file (and line); with `skip_bad_lines` bad lines are counted in `stats` and skipped instead.
    """
    if txt_unit not in TXT_UNITS:
        raise DataError(f"unknown txt unit {txt_unit!r}: choose one of {', '.join(TXT_UNITS)}")
    stats = stats if stats is not None else ReadStatistics()
    paths = [Path(path) for path in inputs]
    for path in paths:  # fail before any work if a file is missing or of an unknown kind
        _check_file(path)
        if path.suffix.lower() not in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
            raise DataError(f"{path}: unknown file type {path.suffix!r} (use .txt, .jsonl or .parquet)")
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            documents = _read_txt(path, txt_unit, stats, skip_bad_lines)
        elif suffix in JSONL_SUFFIXES:
            documents = _read_jsonl(path, text_field, stats, skip_bad_lines)
        else:
            documents = _read_parquet(path, text_field, stats, skip_bad_lines)
        count = 0
        for document in documents:
            count += 1
            yield document
        stats.per_file[str(path)] = count
        stats.documents += count


# -------------------------------------------------------------------------------------------- cleaning
# Full-width punctuation of Chinese prose. NFKC would turn "，" into ",", so a model pretrained on
# normalized text would write ASCII punctuation in Chinese, unlike the (unnormalized) prompts it gets.
CJK_PUNCTUATION = re.compile(r"([，！？：；（）])")


SYMBOL = re.compile(r"[^\w\s]|_")  # neither a letter, a digit nor whitespace (regex \w includes "_")


def normalize_text(text: str) -> str:
    """NFKC (full-width letters and digits, ligatures, compatibility forms) except Chinese punctuation,
    Unix newlines, stripped."""
    parts = CJK_PUNCTUATION.split(text)  # odd indices are the protected punctuation marks
    text = "".join(
        part if index % 2 else unicodedata.normalize("NFKC", part) for index, part in enumerate(parts)
    )
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def quality_issue(text: str, config: CleaningConfig) -> str | None:
    """The name of the first quality filter `text` fails, or None if it passes them all."""
    if len(text) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    symbols = len(SYMBOL.findall(text))
    if symbols / len(text) > config.max_symbol_ratio:
        return "symbol_ratio"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > config.max_repeated_line_fraction:
        return "repeated_lines"
    return None


class Deduplicator:
    """Exact duplicates by a hash of whitespace-collapsed text; near duplicates by MinHash LSH.

    Near duplicates are documents whose character-shingle sets have an estimated Jaccard similarity
    above the threshold with a document already kept (boilerplate variants, mirrored pages).
    """

    def __init__(self, config: CleaningConfig):
        self.config = config
        self.exact: set[bytes] = set()
        self.lsh = None
        if config.near_dedup_threshold is not None:
            from datasketch import MinHash, MinHashLSH

            self.lsh = MinHashLSH(threshold=config.near_dedup_threshold, num_perm=config.num_perm)
            template = MinHash(
                num_perm=config.num_perm, seed=1
            )  # permutations are drawn once, not per document
            self.permutations, self.scheme = template.permutations, template.scheme
        self.kept = 0

    def _minhash(self, text: str) -> Any:
        """MinHash of the character shingles of `text`.

        Shingles are hashed with a polynomial rolling hash in numpy (not datasketch's per-shingle
        SHA-1 in Python, which made deduplication ten times slower than tokenization).
        """
        from datasketch import MinHash

        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        windows = max(1, len(codes) - self.config.shingle_chars + 1)
        hashes = np.zeros(windows, dtype=np.uint64)
        for offset in range(min(self.config.shingle_chars, len(codes))):
            hashes = hashes * np.uint64(1_000_003) + codes[offset : offset + windows]  # wraps mod 2**64
        minhash = MinHash(
            self.config.num_perm, hashfunc=int, permutations=self.permutations, scheme=self.scheme
        )
        minhash.update_batch(np.unique(hashes & np.uint64(0xFFFFFFFF)).tolist())
        return minhash

    def duplicate_kind(self, text: str) -> str | None:
        """ "exact_duplicate" or "near_duplicate" of a kept document, else None (and `text` is kept)."""
        collapsed = " ".join(text.lower().split())
        digest = hashlib.blake2b(collapsed.encode("utf-8"), digest_size=16).digest()
        if self.config.exact_dedup and digest in self.exact:
            return "exact_duplicate"
        if self.lsh is not None:
            minhash = self._minhash(collapsed)
            if self.lsh.query(minhash):
                return "near_duplicate"
            self.lsh.insert(str(self.kept), minhash)
        self.exact.add(digest)
        self.kept += 1
        return None


def clean_documents(documents: Iterable[str], config: CleaningConfig, dropped: Counter) -> Iterator[str]:
    """Normalize, filter and deduplicate; counts each dropped document under its reason in `dropped`."""
    deduplicator = Deduplicator(config)
    for document in documents:
        text = normalize_text(document) if config.normalize else document
        reason = quality_issue(text, config) or deduplicator.duplicate_kind(text)
        if reason:
            dropped[reason] += 1
            continue
        yield text


# ---------------------------------------------------------------------------------------------- shards
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds every id of a vocabulary below 65536 (half the disk and page cache of uint32)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
    """Appends token ids and writes fixed-size `{split}_{index:05d}.npy` files (memory-mappable)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.filled = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = 0

    def add(self, ids: Sequence[int]) -> None:
        self.documents += 1
        ids = np.asarray(ids, dtype=self.dtype)
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.filled)
            self.buffer[self.filled : self.filled + take] = ids[:take]
            self.filled += take
            ids = ids[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.filled:
            name = f"{self.split}_{len(self.shards):05d}.npy"
            np.save(self.directory / name, self.buffer[: self.filled])
            self.shards.append({"file": name, "tokens": self.filled})
            self.filled = 0

    def summary(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
        }


def _is_validation(text: str, val_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return bucket / 2**64 < val_fraction


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class PrepareResult:
    manifest: dict[str, Any]
    seconds: float


def prepare_corpus(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer | str | Path,
    out: str | Path,
    cleaning: CleaningConfig | None = None,
    text_field: str = "text",
    txt_unit: str = "paragraph",
    skip_bad_lines: bool = False,
    from_tasks: int = 0,
    task_seed: int = 0,
    val_fraction: float = 0.01,
    shard_tokens: int = 50_000_000,
    batch_documents: int = 1024,
) -> PrepareResult:
    """Turn text files and/or `from_tasks` generated task documents into token shards in `out`.

    `out` gets train_*.npy and val_*.npy shards (each document's ids followed by EOS; a document goes
    to val with probability `val_fraction`, by a hash of its text), a copy of the tokenizer and
    manifest.json. Raises DataError, leaving `out` untouched, if anything is wrong or nothing is left.
    """
    from nanoseek.data.tasks import task_documents

    start = time.perf_counter()
    cleaning = cleaning or CleaningConfig()
    if not inputs and not from_tasks:
        raise DataError("nothing to prepare: give --input files and/or --from-tasks N")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard tokens must be positive, got {shard_tokens}")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no eos token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    # Control tokens written in raw text ("<｜end▁of▁sentence｜>" on a web page) are encoded as plain
    # text, so only the EOS appended here ends a document. `<think>` and friends stay single tokens.
    encoder = copy.deepcopy(tokenizer.backend)
    encoder.encode_special_tokens = True
    read = ReadStatistics()
    dropped: Counter = Counter()
    sources = clean_documents(
        read_documents(inputs, text_field, txt_unit, skip_bad_lines, read), cleaning, dropped
    )
    tasks = task_documents(from_tasks, seed=task_seed) if from_tasks else []

    with atomic_directory(out) as temp:
        writers = {split: ShardWriter(temp, split, dtype, shard_tokens) for split in ("train", "val")}
        for batch in _batched(itertools.chain(sources, tasks), batch_documents):
            for text, encoding in zip(
                batch, encoder.encode_batch(batch, add_special_tokens=False), strict=True
            ):
                writers["val" if _is_validation(text, val_fraction) else "train"].add(
                    encoding.ids + [tokenizer.eos_id]
                )
        for writer in writers.values():
            writer.flush()
        kept = sum(writer.documents for writer in writers.values())
        if kept == 0:
            reasons = ", ".join(f"{reason} {count}" for reason, count in dropped.most_common()) or "none"
            raise DataError(
                f"no documents left after filtering ({read.documents} read; dropped: {reasons}); "
                "loosen the filters with --filter key=value"
            )
        tokenizer.save_pretrained(temp / "tokenizer")
        manifest = {
            "format": "nanoseek-token-shards",
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id,
            "tokenizer": "tokenizer",
            "splits": {split: writer.summary() for split, writer in writers.items()},
            "sources": [{"path": path, "documents": count} for path, count in read.per_file.items()],
            "tasks": {"documents": len(tasks), "seed": task_seed} if from_tasks else None,
            "cleaning": dataclasses.asdict(cleaning),
            "statistics": {
                "documents_read": read.documents,
                "dropped": dict(dropped),
                "kept_from_files": kept - len(tasks),
                "kept": kept,
            },
            "skipped_lines": read.bad_lines,
            "skipped_line_examples": read.bad_line_examples,
            "text_field": text_field,
            "txt_unit": txt_unit,
            "val_fraction": val_fraction,
        }
        atomic_write_text(temp / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return PrepareResult(manifest, time.perf_counter() - start)


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared shard directory (checked for the format this module writes)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} has no {MANIFEST}: prepare it with `nanoseek data prepare`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != "nanoseek-token-shards" or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a version {FORMAT_VERSION} nanoseek token-shard manifest")
    return manifest


# ------------------------------------------------------------------------------------------------- CLI
def format_summary(result: PrepareResult) -> str:
    """Documents kept and dropped by each stage, tokens per split and throughput, as a small table."""
    manifest = result.manifest
    statistics = manifest["statistics"]
    width = 28
    lines = [f"{'stage':<{width}}{'documents':>10}"]
    lines.append(f"{'read from files':<{width}}{statistics['documents_read']:>10}")
    if manifest["skipped_lines"]:
        lines.append(f"{'  bad lines skipped':<{width}}{manifest['skipped_lines']:>10}")
    for reason, count in statistics["dropped"].items():
        lines.append(f"{'  dropped ' + reason:<{width}}{-count:>10}")
    lines.append(f"{'kept from files':<{width}}{statistics['kept_from_files']:>10}")
    if manifest["tasks"]:
        lines.append(f"{'generated tasks':<{width}}{manifest['tasks']['documents']:>10}")
    tokens = 0
    for split, summary in manifest["splits"].items():
        tokens += summary["tokens"]
        lines.append(
            f"{split + ' split':<{width}}{summary['documents']:>10} docs {summary['tokens']:>10} tokens in {len(summary['shards'])} shards ({manifest['dtype']})"
        )
    lines.append(
        f"{tokens} tokens in {result.seconds:.2f} s ({tokens / max(result.seconds, 1e-9):,.0f} tokens/s)"
    )
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", metavar="subcommand", required=True)
    prepare = commands.add_parser(
        "prepare",
        help="text files and/or generated tasks -> token shards",
        description=prepare_corpus.__doc__,
    )
    prepare.add_argument(
        "--input", nargs="*", default=[], metavar="FILE", help=".txt, .jsonl or .parquet files"
    )
    prepare.add_argument(
        "--tokenizer", required=True, metavar="DIR", help="tokenizer directory (tokenizer.json)"
    )
    prepare.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    prepare.add_argument(
        "--text-field", default="text", help="field holding the text in .jsonl/.parquet rows"
    )
    prepare.add_argument(
        "--txt-unit", default="paragraph", choices=TXT_UNITS, help="what one document of a .txt file is"
    )
    prepare.add_argument(
        "--skip-bad-lines", action="store_true", help="skip (and count) malformed lines instead of failing"
    )
    prepare.add_argument(
        "--from-tasks", type=int, default=0, metavar="N", help="add N generated task documents"
    )
    prepare.add_argument("--task-seed", type=int, default=0)
    prepare.add_argument("--val-fraction", type=float, default=0.01)
    prepare.add_argument("--shard-tokens", type=int, default=50_000_000)
    prepare.add_argument(
        "--filter",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="cleaning settings, e.g. min_chars=64 near_dedup_threshold=null (fields of CleaningConfig)",
    )


def cli_main(args: argparse.Namespace) -> int:
    cleaning = CleaningConfig(**parse_overrides(CleaningConfig, args.filter))
    result = prepare_corpus(
        args.input,
        args.tokenizer,
        args.out,
        cleaning=cleaning,
        text_field=args.text_field,
        txt_unit=args.txt_unit,
        skip_bad_lines=args.skip_bad_lines,
        from_tasks=args.from_tasks,
        task_seed=args.task_seed,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
    )
    print(format_summary(result))
    print(f"-> {args.out}")
    return 0
