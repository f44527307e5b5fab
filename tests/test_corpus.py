"""Corpus pipeline: readers, cleaning, deduplication, shards + manifest, errors without partial output."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import CHINESE, ENGLISH, small_tokenizer

from nanoseek.cli import main as cli_main
from nanoseek.data.corpus import (
    CleaningConfig,
    load_manifest,
    normalize_text,
    prepare_corpus,
    quality_issue,
    read_documents,
    token_dtype,
)
from nanoseek.errors import DataError

PROSE = [
    "Rivers carry water from the mountains to the sea, shaping valleys over thousands of years.",
    "A good map shows roads, rivers and towns, and a scale that tells how far apart they are.",
    "Bread is made from flour, water, salt and yeast, kneaded and left to rise before baking.",
    "春天到了，花园里开满了各种颜色的花，蜜蜂和蝴蝶在花丛中飞来飞去，非常热闹。",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    small_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path, records):
    path.write_text(
        "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8"
    )
    return path


def prepare_cli(source, tokenizer_dir, out, *options) -> int:
    arguments = [
        "data",
        "prepare",
        "--input",
        str(source),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out),
    ]
    return cli_main([*arguments, *options])


def shard_documents(directory, split="train"):
    """Decode the documents of a split back from its shards (they are separated by EOS)."""
    manifest = load_manifest(directory)
    tokens = np.concatenate([np.load(directory / s["file"]) for s in manifest["splits"][split]["shards"]])
    tokenizer = small_tokenizer()
    boundaries = np.flatnonzero(tokens == tokenizer.eos_id)
    starts = np.concatenate([[0], boundaries[:-1] + 1])
    return [tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(starts, boundaries, strict=True)]


def test_prepare_reads_all_formats_and_round_trips(tmp_path, tokenizer_dir):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": PROSE[0], "id": 1}, {"text": PROSE[1]}])
    txt = tmp_path / "b.txt"
    txt.write_text(f"{PROSE[2]}\n\n\n{ENGLISH}\n", encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": [PROSE[3], CHINESE], "n": [1, 2]}), parquet)
    out = tmp_path / "shards"
    jsonl_and_txt = prepare_corpus([jsonl, txt], tokenizer_dir, out, val_fraction=0.0, shard_tokens=64)
    manifest = jsonl_and_txt.manifest
    assert manifest == load_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["statistics"]["kept"] == 4
    assert [s["documents"] for s in manifest["sources"]] == [2, 2]
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1 and all(s["tokens"] <= 64 for s in train["shards"])
    assert train["tokens"] == sum(len(np.load(out / s["file"], mmap_mode="r")) for s in train["shards"])
    assert shard_documents(out) == [PROSE[0], PROSE[1], PROSE[2], ENGLISH]
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    prepare_corpus([parquet], tokenizer_dir, out, text_field="content", val_fraction=0.0)  # replaces `out`
    assert shard_documents(out) == [PROSE[3], CHINESE]


def test_prepare_is_deterministic_and_splits_validation_by_hash(tmp_path, tokenizer_dir):
    records = [{"text": f"Document number {i}: " + PROSE[i % 3]} for i in range(200)]
    source = write_jsonl(tmp_path / "a.jsonl", records)
    clean = CleaningConfig(near_dedup_threshold=None)
    first = prepare_corpus([source], tokenizer_dir, tmp_path / "one", clean, val_fraction=0.1).manifest
    prepare_corpus([source], tokenizer_dir, tmp_path / "two", clean, val_fraction=0.1)
    for split in ("train", "val"):
        for shard in first["splits"][split]["shards"]:
            assert (tmp_path / "one" / shard["file"]).read_bytes() == (
                tmp_path / "two" / shard["file"]
            ).read_bytes()
    assert 5 <= first["splits"]["val"]["documents"] <= 40 and first["statistics"]["kept"] == 200
    assert not set(shard_documents(tmp_path / "one", "train")) & set(shard_documents(tmp_path / "one", "val"))


def test_normalization_and_quality_filters():
    assert normalize_text("  ＡＢＣ１２３\r\nﬁne  ") == "ABC123\nfine"
    assert normalize_text("你好，世界！（１）") == "你好，世界！（1）"  # Chinese punctuation stays full width
    config = CleaningConfig(min_chars=10)
    assert quality_issue("short", config) == "too_short"
    assert quality_issue("x" * 20, CleaningConfig(min_chars=1, max_chars=10)) == "too_long"
    assert quality_issue("$$$ ### !!! %%% ^^^ &&& words", config) == "symbol_ratio"
    assert quality_issue("same line here\n" * 5 + "another line", config) == "repeated_lines"
    assert quality_issue(PROSE[0], config) is None and quality_issue(PROSE[3], config) is None


def test_filters_and_deduplication_are_counted(tmp_path, tokenizer_dir, capsys):
    long = PROSE[0] + " " + PROSE[1]
    near = long.replace("thousands", "hundreds")  # one word changed: estimated Jaccard ~0.85
    records = [
        long,
        long,
        "  " + long.upper(),
        near,
        PROSE[1],
        "tiny",
        "@@@@ #### $$$$ %%%% ^^^^ &&&& ****",
        PROSE[2],
    ]
    source = write_jsonl(tmp_path / "a.jsonl", [{"text": text} for text in records])
    out = tmp_path / "out"
    assert prepare_cli(source, tokenizer_dir, out, "--val-fraction", "0") == 0
    statistics = load_manifest(out)["statistics"]
    assert statistics["dropped"] == {
        "exact_duplicate": 2,
        "near_duplicate": 1,
        "too_short": 1,
        "symbol_ratio": 1,
    }
    assert shard_documents(out) == [long, PROSE[1], PROSE[2]]
    summary = capsys.readouterr().out
    assert "dropped near_duplicate" in summary and "kept from files" in summary and "tokens/s" in summary
    prepare_cli(
        source,
        tokenizer_dir,
        out,
        "--filter",
        "near_dedup_threshold=null",
        "exact_dedup=false",
        "min_chars=1",
    )
    assert load_manifest(out)["statistics"]["dropped"] == {"symbol_ratio": 1}


def test_bad_jsonl_line_fails_or_is_skipped(tmp_path, tokenizer_dir):
    source = tmp_path / "a.jsonl"
    source.write_bytes(
        (json.dumps({"text": PROSE[0]}) + "\n{broken\n" + json.dumps({"title": "no text"}) + "\n").encode()
        + b'{"text": "caf\xe9 latin-1"}\n'
        + (json.dumps({"text": PROSE[1]}) + "\n").encode()
    )
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
        prepare_corpus([source], tokenizer_dir, out)
    assert not out.exists()
    manifest = prepare_corpus([source], tokenizer_dir, out, skip_bad_lines=True, val_fraction=0).manifest
    assert manifest["skipped_lines"] == 3
    assert [e.split(": ", 1)[0].rsplit("/", 1)[1] for e in manifest["skipped_line_examples"]] == [
        "a.jsonl:2",
        "a.jsonl:3",
        "a.jsonl:4",
    ]
    assert "not valid UTF-8" in manifest["skipped_line_examples"][2]
    assert shard_documents(out) == [PROSE[0], PROSE[1]]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", b"", "file is empty"),
        ("bad.txt", b"fine\n\xff\xfe\n", "bad.txt:2: not valid UTF-8"),
        ("data.csv", b"a,b\n", "unknown file type"),
        ("broken.parquet", b"not a parquet file", "broken.parquet: cannot read as parquet"),
        ("short.jsonl", b'{"text": "too short"}\n', "no documents left after filtering"),
    ],
)
def test_errors_are_one_line_and_leave_no_output(tmp_path, tokenizer_dir, capsys, name, content, message):
    source = tmp_path / name
    if content is not None:
        source.write_bytes(content)
    out = tmp_path / "out"
    code = prepare_cli(source, tokenizer_dir, out)
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1 and "Traceback" not in error
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_parquet_without_the_text_column(tmp_path, tokenizer_dir):
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": [PROSE[0]]}), parquet)
    with pytest.raises(DataError, match="no column 'text' .*body"):
        list(read_documents([parquet]))


def test_txt_units(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    assert list(read_documents([path], txt_unit="paragraph")) == ["one\ntwo\n", "three\n"]
    assert list(read_documents([path], txt_unit="line")) == ["one\n", "two\n", "three\n"]
    assert list(read_documents([path], txt_unit="file")) == ["one\ntwo\n\nthree\n"]


def test_from_tasks_and_control_tokens_in_raw_text(tmp_path, tokenizer_dir):
    raw = PROSE[0] + " <｜end▁of▁sentence｜> is just text here."
    source = write_jsonl(tmp_path / "a.jsonl", [{"text": raw}])
    raw_text = CleaningConfig(normalize=False)  # NFKC would turn the full-width bars into ASCII ones
    manifest = prepare_corpus(
        [source], tokenizer_dir, tmp_path / "out", raw_text, from_tasks=40, val_fraction=0
    ).manifest
    assert manifest["tasks"] == {"documents": 40, "seed": 0} and manifest["statistics"]["kept"] == 41
    documents = shard_documents(tmp_path / "out")
    assert documents[0] == raw  # one document: the EOS written in the text did not end it
    assert all("</think>\n<answer>" in d for d in documents[1:])
    tokens = np.load(tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["file"])
    assert int((tokens == 6).sum()) == 40  # `<think>` stays a single token in task text


def test_token_dtype():
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(129280) == np.uint32
