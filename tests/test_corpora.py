"""Person pre-training corpora (WebPerson, SYNTH-PEDES, MALS, LUPerson-T, HAM-PEDES, your own pairs) converted
as their releases lay them out: every planted fault rejected with its reason, nothing lost, the
same bytes from any number of workers, the streaming JSON reader, the synthetic pre-training
corpus through the real reader into the training pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus_plant import (bomb_png, image_file, jpeg, plant_ham_pedes, plant_luperson_t, plant_mals,
                          plant_synth_pedes, plant_webperson)
from runs import REPO
from shards import jsonstream, schema
from shards.corpus_build import CorpusOptions, convert_corpus

PLANTERS = {"webperson": plant_webperson, "synth-pedes": plant_synth_pedes, "mals": plant_mals,
            "luperson-t": plant_luperson_t, "ham-pedes": plant_ham_pedes}


def build(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", "build", *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / schema.MANIFEST_FILE).to_pylist()


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / schema.REJECTS_FILE).read_text().splitlines()]


def check_rejects(out: Path, expected: dict) -> None:
    """Each planted fault is rejected for its reason, and nothing else is."""
    got = Counter((r["source"], r["reason"]) for r in rejects(out) if r["reason"] != "malformed record")
    assert got == Counter((s.removesuffix("#dup"), reason) for s, reason in expected.items())


def check_dataset(out: Path) -> dict:
    """dataset.json, manifest and shards agree; nothing lost; train identities never span two shards."""
    info = json.loads((out / schema.DATASET_FILE).read_text())
    rows = manifest(out)
    assert info["read"] == info["written"] + info["rejected"] and info["written"] == len(rows)
    assert len(rejects(out)) == info["rejected"] == sum(info["rejected_by_reason"].values())
    on_disk, in_manifest = {}, {}
    for path in sorted(out.glob("*/*.tar")):
        with tarfile.open(path) as t:
            on_disk[(path.parent.name, path.name)] = [m.name.split(".")[0] for m in t.getmembers()][::2]
    for r in rows:
        in_manifest.setdefault((r["split"], r["shard"]), []).append(r["key"])
    listed = {(split, s["name"]): s["samples"] for split in schema.SPLITS for s in info["splits"][split]["shards"]}
    assert on_disk == in_manifest and {k: len(v) for k, v in on_disk.items()} == listed  # same samples, same order
    assert {s: info["splits"][s]["images"] for s in schema.SPLITS} == {s: sum(r["split"] == s for r in rows)
                                                                       for s in schema.SPLITS}
    train = [r for r in rows if r["split"] == "train"]
    shards_of = {}
    for r in train:
        shards_of.setdefault(r["pid"], set()).add(r["shard"])
    assert all(len(s) == 1 for s in shards_of.values())
    assert max(r["pid"] for r in train) < info["train_identities"]
    val = {r["orig_pid"] for r in rows if r["split"] == "val"}
    assert not val & {r["orig_pid"] for r in train}  # identity-disjoint
    return info


@pytest.mark.parametrize("corpus", sorted(PLANTERS))
def test_each_corpus_as_released_with_its_faults(corpus, tmp_path):
    expected = PLANTERS[corpus](tmp_path / "raw")
    run = build("--dataset", corpus, "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                "--chunk-size", "8", "--val-fraction", "0.1", "--workers", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    info = check_dataset(tmp_path / "out")
    check_rejects(tmp_path / "out", expected)
    rows = manifest(tmp_path / "out")
    assert f"read {info['read']} = written {info['written']} + rejected {info['rejected']}" in run.stdout
    assert info["splits"]["val"]["images"] > 0 and info["splits"]["test"]["images"] == 0
    assert info["val_policy"]["fraction"] == 0.1 and info["conversion"]["chunk_size"] == 8
    assert not (tmp_path / ".out.convert").exists()  # the work folder goes once the dataset is in place
    if corpus == "synth-pedes":  # real identities: 12 given ids, images of one id under one label
        assert info["identities"] == "given"
        assert {r["orig_pid"] for r in rows} == {str(i) for i in range(1, 13)}
        assert all(len({r["pid"] for r in rows if r["orig_pid"] == p}) == 1 for p in {r["orig_pid"] for r in rows})
        assert max(len(r["captions"]) for r in rows) == 3
        assert sum(r["reason"] == "malformed record" for r in rejects(tmp_path / "out")) == 1
    else:  # one pseudo-identity per image
        assert info["identities"] == "pseudo"
        assert len({r["orig_pid"] for r in rows}) == len(rows) and all(r["orig_pid"] == r["source"] for r in rows)
    if corpus == "webperson":
        assert info["read"] == 60 and all(len(r["captions"]) == 2 for r in rows)
    if corpus == "ham-pedes":  # (synthpedes_dataset.json beside it is SYNTH-PEDES's, not read)
        assert info["read"] == 24 and all(len(r["captions"]) == 2 for r in rows)
        assert "not HAM's" not in {c for r in rows for c in r["captions"]}
        assert [r["source"] for r in rejects(tmp_path / "out") if r["reason"] == "malformed record"] == ["Part1/0/num.jpg"]
    if corpus == "mals":
        assert sorted(info["builder"]["annotations"]) == ["gene_attrs/g_4x_attrs.json", "gene_attrs/g_c_g_a_0_attrs.json"]
        assert all(len(r["captions"]) == 1 for r in rows)


def test_parquet_images_are_bounded_and_bombs_rejected(tmp_path, monkeypatch):
    import shards.chunks

    root = tmp_path / "raw"
    plant_webperson(root, n=10, files=1, faults=False)
    table = pq.read_table(root / "data" / "train-00000-of-00001.parquet").to_pylist()
    table[2]["image"]["bytes"] = bomb_png()
    table[4]["image"]["bytes"] = b"\xff" * 60_000  # refused by its size, never decoded
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(root / "data" / "train-00000-of-00001.parquet")),
                   root / "data" / "train-00000-of-00001.parquet")
    assert len(table[2]["image"]["bytes"]) < 50_000
    monkeypatch.setattr(shards.chunks, "MAX_IMAGE_BYTES", 50_000)
    info = convert_corpus("webperson", root, tmp_path / "out", CorpusOptions(val_fraction=0), workers=1,
                          progress=False)
    by_source = {r["source"]: r for r in rejects(tmp_path / "out")}
    assert info["rejected_by_reason"] == {"image file too large": 2}
    assert "DecompressionBomb" in by_source[table[2]["image_path"]]["detail"]
    assert "bytes (at most" in by_source[table[4]["image_path"]]["detail"]


@pytest.mark.parametrize("bomb", ["image", "image among many small rows", "caption", "caption among many rows"])
def test_a_parquet_decompression_bomb_is_refused_before_it_is_decompressed(tmp_path, monkeypatch, bomb):
    # A few KB on disk that decompress to gigabytes, alone in its row group or hidden among many
    # small rows (the limits are scaled down here: 2 MB of one byte repeated against 50 KB per image,
    # 1 KB of text per row, 1 MB before the compression ratio counts); the file's metadata says so
    # before anything is decompressed.
    import shards.chunks
    import shards.corpora
    from shards.errors import ConvertError

    root, name = tmp_path / "raw", "train-00000-of-00001.parquet"
    plant_webperson(root, n=10, files=1, faults=False)
    table = pq.read_table(root / "data" / name).to_pylist()
    if bomb.endswith("many small rows") or bomb.endswith("many rows"):
        table = table + [dict(table[i % 10], image_path=f"web/pad/{i}.jpg",
                              image={**table[i % 10]["image"], "bytes": b"x", "path": f"{i}.jpg"}) for i in range(390)]
    if bomb.startswith("image"):
        table[2]["image"]["bytes"] = bytes(2 << 20)
    else:
        table[2]["caption1"] = "a" * (2 << 20)
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(root / "data" / name)), root / "data" / name,
                   compression="zstd")
    assert (root / "data" / name).stat().st_size < 100_000
    monkeypatch.setattr(shards.chunks, "MAX_IMAGE_BYTES", 50_000)
    monkeypatch.setattr(shards.corpora, "MAX_TEXT_ROW_BYTES", 1000)
    monkeypatch.setattr(shards.corpora, "BOMB_MIN_BYTES", 1 << 20)
    options = CorpusOptions(val_fraction=0)
    if bomb.startswith("caption"):
        with pytest.raises(ConvertError, match="row group 0's text is .* uncompressed .*refused without decompressing"):
            convert_corpus("webperson", root, tmp_path / "out", options, workers=1, progress=False)
        return
    with pytest.raises(Exception, match=f"all {len(table)} records rejected: image file too large"):
        convert_corpus("webperson", root, tmp_path / "out", options, workers=1, progress=False)
    listed = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert len(listed) == len(table) and all("row group's images are" in r["detail"] for r in listed)


def test_one_value_shared_by_many_rows_through_a_dictionary_is_read_a_few_rows_at_a_time(tmp_path, monkeypatch):
    # A Parquet column stores a repeated value once (a dictionary page) and each row as an index: 2,000
    # rows of one 50 KB caption are 50 KB in the file and in its sizes, 100 MB once read. Batches are
    # sized as though every row also held the whole dictionary page (the budget scaled down to 1 MB).
    import shards.corpora
    from shards.corpora import annotation_files, items

    root, name = tmp_path / "raw", "train-00000-of-00001.parquet"
    plant_webperson(root, n=10, files=1, faults=False)
    rows = pq.read_table(root / "data" / name).to_pylist()
    rows = [dict(rows[i % 10], image_path=f"web/{i}.jpg", caption1="a" * 50_000) for i in range(2000)]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(root / "data" / name)), root / "data" / name)
    meta = pq.ParquetFile(root / "data" / name).metadata
    assert meta.num_row_groups == 1 and meta.row_group(0).column(2).total_uncompressed_size < 200_000
    monkeypatch.setattr(shards.corpora, "TEXT_BATCH_BYTES", 1 << 20)
    tracemalloc.start()
    read = sum(1 for _ in items("webperson", root, annotation_files("webperson", root)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert read == 2000 and peak < 20 << 20, peak  # (all 2,000 rows in one batch: 100 MB)


def test_pairs_jsonl_and_parquet_with_bytes(tmp_path):
    root = tmp_path / "raw"
    lines = []
    for k in range(12):
        image_file(root / f"mine/{k}.jpg", k)
        caption = f"person {k}\u2028second line\u2029third\x85end" if k == 0 else f"person {k}"
        record = {"image": f"mine/{k}.jpg", "captions" if k % 2 else "caption": [caption] if k % 2 else caption}
        if k < 6:
            record["pid"] = f"p{k // 3}"  # two identities of three images, then six images of their own
        lines.append(json.dumps(record, ensure_ascii=False))
    lines.insert(3, "{not json")
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    info = convert_corpus("pairs", root, tmp_path / "out", CorpusOptions(val_fraction=0), workers=1, progress=False)
    rows = manifest(tmp_path / "out")
    assert info["read"] == 13 and info["rejected_by_reason"] == {"malformed record": 1}
    assert rows[0]["captions"] == ["person 0\u2028second line\u2029third\x85end"]  # one record, not three
    assert [r["pid"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7]

    table = pa.table({"image": [jpeg(k) for k in range(5)] + [b"junk"],
                      "captions": [[f"c{k}", f"d{k}"] for k in range(6)], "pid": [1, 1, 2, 2, 3, 3]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "pairs.parquet")
    info = convert_corpus("pairs", tmp_path / "pq", tmp_path / "out2", CorpusOptions(val_fraction=0), workers=1,
                          progress=False)
    assert info["written"] == 5 and info["rejected_by_reason"] == {"unreadable or truncated image": 1}
    assert [r["source"] for r in manifest(tmp_path / "out2")][:2] == ["pairs.parquet#0", "pairs.parquet#1"]

    # The fields under the other names a corpus may use: file_path / text / id.
    (tmp_path / "alt").mkdir()
    lines = [json.dumps({"file_path": f"../raw/mine/{k}.jpg" if k == 0 else f"i/{k}.jpg", "text": f"t{k}", "id": k // 2})
             for k in range(4)]
    for k in range(1, 4):
        image_file(tmp_path / "alt" / f"i/{k}.jpg", k)
    (tmp_path / "alt" / "pairs.jsonl").write_text("\n".join(lines))
    info = convert_corpus("pairs", tmp_path / "alt", tmp_path / "out3", CorpusOptions(val_fraction=0), workers=1,
                          progress=False)
    assert info["rejected_by_reason"] == {"path escapes the root": 1}
    assert [(r["orig_pid"], r["captions"]) for r in manifest(tmp_path / "out3")] == [("0", ["t1"]), ("1", ["t2"]),
                                                                                     ("1", ["t3"])]


def test_three_workers_write_the_same_bytes_as_one(tmp_path):
    plant_webperson(tmp_path / "raw", n=90, files=3)
    outs = {}
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        run = build("--dataset", "webperson", "--root", str(tmp_path / "raw"), "--out", str(out), "--chunk-size", "10",
                    "--shard-samples", "4", "--val-fraction", "0.1", "--workers", str(workers))
        assert run.returncode == 0, run.stderr[-3000:]
        outs[workers] = snapshot(out)
    assert outs[1] == outs[3]
    assert sum(n.startswith("train/") for n in outs[1]) >= 15  # 9 chunks of up to 3 shards


def test_a_conversion_with_other_settings_is_refused_while_one_is_unfinished(tmp_path):
    from shards.chunking import Settings, file_stamps, make_plan, work_folder
    from shards.corpora import annotation_files

    plant_synth_pedes(tmp_path / "raw", faults=False)
    files = annotation_files("synth-pedes", tmp_path / "raw")
    work = work_folder(tmp_path / "out")
    work.mkdir()
    make_plan(work, Settings("synth-pedes", str((tmp_path / "raw").resolve()), file_stamps(files), chunk_size=5,
                             name="synth-pedes"), files, progress=False)
    run = build("--dataset", "synth-pedes", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                "--chunk-size", "6")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("error: ") and "chunk_size" in run.stderr and "to start over" in run.stderr
    run = build("--dataset", "synth-pedes", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                "--chunk-size", "5", "--val-fraction", "0.01")
    assert run.returncode == 0, run.stderr  # the same settings: resumed (nothing converted yet) and finished


def test_a_refused_conversion_keeps_its_chunks_and_allow_rejects_writes_them(tmp_path):
    root = tmp_path / "raw"
    plant_luperson_t(root, n=10, faults=False)
    for p in list((root / "LUPerson").rglob("*.jpg"))[:7]:
        p.unlink()
    run = build("--dataset", "luperson-t", "--root", str(root), "--out", str(tmp_path / "out"), "--chunk-size", "4")
    assert run.returncode == 2 and "7 of 10 records rejected for one reason, missing image file" in run.stderr
    assert "the converted chunks are kept" in run.stderr and (tmp_path / ".out.convert" / "chunks").is_dir()
    assert not (tmp_path / "out").exists()
    run = build("--dataset", "luperson-t", "--root", str(root), "--out", str(tmp_path / "out"), "--chunk-size", "4",
                "--allow-rejects")
    assert run.returncode == 0 and "resuming: 3 of 3 chunks already converted" in run.stderr


# ------------------------------------------------------------------------------- JSON streaming


def test_json_list_reader_streams_across_window_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonstream, "READ_CHARS", 7)  # every value and number cut by a window edge
    values = [{"id": 12345678901234, "t": "é\u2028ü" * 5}, 3.25, [1, [2, {"a": None}]], "x" * 30, True, 1234567]
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf \n" + json.dumps(values, ensure_ascii=False, indent=3).encode())
    assert list(jsonstream.iter_json_array(path)) == values
    path.write_text("[]")
    assert list(jsonstream.iter_json_array(path)) == []
    for text, fragment in (('{"a": 1}', "expected a JSON list"), ("[1, 2", "truncated"), ("[1, {\"a\": }]", "element 1"),
                           ("[1] 2", "after the end"), ("", "empty file"), ("[" * 100000 + "]" * 100000, "nested")):
        path.write_text(text)
        with pytest.raises(ValueError, match=fragment):
            list(jsonstream.iter_json_array(path))


def test_ham_pedes_annotations_elsewhere_and_as_a_list_of_records(tmp_path):
    # The release's folder (HAM_data/HAM_PEDES) beside the SYNTH-PEDES images: --annotations names the
    # file; a list of {"file_path", "captions"} reads as the object does. Two JSON files in the root
    # besides SYNTH-PEDES's: which one is meant is asked, not guessed.
    from shards.errors import ConvertError

    root = tmp_path / "PLIP_data"
    plant_ham_pedes(root, n=8, faults=False)
    by_path = json.loads((root / "caption.json").read_text())
    (tmp_path / "HAM_PEDES").mkdir()
    records = [{"file_path": k, "captions": v} for k, v in by_path.items()]
    (tmp_path / "HAM_PEDES" / "ham_pedes.json").write_text(json.dumps(records))
    (root / "caption.json").rename(root / "random100w_2HAMcaptions.json")
    (root / "other.json").write_text("{}")
    options = CorpusOptions(val_fraction=0)
    with pytest.raises(ConvertError, match="ham-pedes: 2 JSON files in .*pass the annotation file with --annotations"):
        convert_corpus("ham-pedes", root, tmp_path / "out", options, workers=1, progress=False)
    listed = convert_corpus("ham-pedes", root, tmp_path / "out", CorpusOptions(
        val_fraction=0, annotations=str(tmp_path / "HAM_PEDES" / "ham_pedes.json")), workers=1, progress=False)
    (root / "other.json").unlink()
    as_object = convert_corpus("ham-pedes", root, tmp_path / "out2", options, workers=1, progress=False)
    assert listed["written"] == as_object["written"] == 8
    assert [(r["source"], r["captions"]) for r in manifest(tmp_path / "out")] == [
        (r["source"], r["captions"]) for r in manifest(tmp_path / "out2")] == list(by_path.items())


def test_json_object_reader_streams_members_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonstream, "READ_CHARS", 5)
    members = [("Part1/7/1.jpg", ["a man", "in a \u2028 coat"]), ("Part1/7/2.jpg", []), ("x", {"k": [1, 2.5]}),
               ("Part1/7/1.jpg", ["again"])]  # (a key twice comes twice: the reader rejects the duplicate)
    path = tmp_path / "caption.json"
    path.write_text("\ufeff{" + ", ".join(f"{json.dumps(k)} :\n {json.dumps(v)}" for k, v in members) + "}")
    assert list(jsonstream.iter_json_object(path)) == members and jsonstream.first_character(path) == "{"
    path.write_text(" {} ")
    assert list(jsonstream.iter_json_object(path)) == []
    for text, fragment in (("[1]", "expected a JSON object"), ('{"a": [1]', "truncated"), ('{"a" [1]}', "expected ':'"),
                           ('{1: 2}', "not a well-formed JSON object"), ('{"a": 1} x', "after the end of the object"),
                           ('{"a": 1 "b": 2}', "expected ',' or '}'")):
        path.write_text(text)
        with pytest.raises(ValueError, match=fragment):
            list(jsonstream.iter_json_object(path))


def test_json_list_reader_memory_follows_one_record(tmp_path):
    path = tmp_path / "big.json"
    record = {"file_path": "Part1/1/1.jpg", "captions": ["a man in a black coat " * 4] * 2, "id": 1}
    with open(path, "w") as f:
        f.write("[" + ",".join([json.dumps(record)] * 30000) + "]")  # ~9 MB
    tracemalloc.start()
    n = sum(1 for _ in jsonstream.iter_json_array(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 30000 and peak < 8 * jsonstream.READ_CHARS  # a few windows, not the 9 MB file


def test_jsonl_benchmark_reader_splits_lines_on_newline_only(tmp_path):
    from shards.converters import convert

    root = tmp_path / "raw"
    separators = ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"]
    lines = []
    for k, sep in enumerate(separators):
        image_file(root / f"{k}.jpg", k)
        lines.append(json.dumps({"image": f"{k}.jpg", "captions": [f"one{sep}two"], "pid": k, "split": "train"},
                                ensure_ascii=False))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    info = convert("jsonl", root, tmp_path / "out", progress=False)
    assert info["read"] == len(separators)  # one record per line, whatever the caption holds
    captions = {r["source"]: r["captions"][0] for r in manifest(tmp_path / "out")}
    assert captions == {f"{k}.jpg": f"one{sep}two" for k, sep in enumerate(separators)}


# ------------------------------------------------------------------------------- synthetic pre-training


def test_synthetic_pretrain_corpus_is_read_by_the_real_reader_and_the_train_loader(tmp_path):
    from itself.config import DataConfig
    from itself.data.pipeline import train_loader
    from shards.pretrain import PretrainSpec, captions_of, write_raw_corpus
    from shards.synthetic import SyntheticSpec, make_people, people_of, synthetic_records

    run = build("--dataset", "synthetic-pretrain", "--out", str(tmp_path / "pre"), "--pairs", "400",
                "--image-size", "48x16", "--workers", "2", "--val-fraction", "0.05")
    assert run.returncode == 0, run.stderr[-3000:]
    info = check_dataset(tmp_path / "pre")
    assert info["name"] == "synthetic-pretrain" and info["identities"] == "pseudo"
    assert info["builder"]["dataset"] == "webperson" and info["builder"]["generated"]["pairs"] == 400
    assert info["splits"]["train"]["images"] == 190 and info["splits"]["val"]["images"] == 10
    assert info["splits"]["train"]["captions"] == 380
    assert not list(tmp_path.glob(".pre.*"))  # raw corpus and work folder removed
    loader = train_loader(DataConfig(root=str(tmp_path / "pre"), image_size=(48, 16), num_workers=0), rank=0,
                          world_size=1, micro_batch=8)
    loader.set_epoch(0)
    batches = [b for _, b in zip(range(3), loader)]
    assert len(batches) == 3 and batches[0]["images"].shape == (8, 3, 48, 16)

    # Its own phrasings: no caption of the corpus is a caption of the embedded benchmark.
    pre = {c for r in manifest(tmp_path / "pre") for c in r["captions"]}
    bench = {c for r in synthetic_records(SyntheticSpec(num_ids=60)) for c in r.captions}
    assert not pre & bench
    # No person of the benchmark's val or test split is drawn (the exclusion is enforced).
    held_out = people_of(SyntheticSpec())
    exclude = frozenset(held_out["val"] | held_out["test"])
    import random

    drawn = make_people(2000, 0.3, random.Random(1), exclude)
    assert not set(drawn) & exclude and len(exclude) == 80
    assert captions_of(drawn[0], random.Random(0))[0] != captions_of(drawn[0], random.Random(0))[1]
    write_raw_corpus(tmp_path / "raw", PretrainSpec(pairs=20, image_size=(48, 16)))
    part = pq.read_table(tmp_path / "raw" / "data" / "train-00000-of-00001.parquet")
    assert part.schema.names == ["image", "image_path", "caption1", "caption2"] and part.num_rows == 10
    assert b"huggingface" in part.schema.metadata


def test_chunks_converted_apart_merge_only_when_all_are_there(tmp_path):
    """The multi-node path without a cluster: plan, convert chunks in any order, merge."""
    from shards.chunks import convert_chunk
    from shards.corpus_build import merge_corpus, plan_corpus
    from shards.errors import BuildFailed

    plant_synth_pedes(tmp_path / "raw")
    options = CorpusOptions(chunk_size=6, val_fraction=0.1)
    work, plan = plan_corpus("synth-pedes", tmp_path / "raw", tmp_path / "out", options, progress=False)
    n = len(plan["chunks"])
    assert n == 6 and sum(c["identities"] for c in plan["chunks"]) == 12
    for i in reversed(range(1, n)):
        convert_chunk(work, i)
    with pytest.raises(BuildFailed, match=f"1 of {n} chunks are not converted .e.g. chunk 0"):
        merge_corpus(tmp_path / "out")
    assert not (tmp_path / "out").exists() and work.is_dir()
    convert_chunk(work, 0)
    merge_corpus(tmp_path / "out")
    reference = convert_corpus("synth-pedes", tmp_path / "raw", tmp_path / "ref", options, workers=1, progress=False)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "ref") and reference["written"] == 36


@pytest.mark.slow
def test_convert_bench_quick_run(tmp_path):
    run = subprocess.run([sys.executable, "bench/convert_bench.py", "--quick", "--cache", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for text in ("img/s/core", "speed-up of the conversion step with 2 workers", "peak memory (PSS) at 3000 vs 300",
                 "same manifest for every worker count: True"):
        assert text in run.stdout, text
