"""Galleries are read like datasets (issue 25): the builder's rules for folder galleries (a link
leaving the folder, a FIFO, a file over 64 MiB, a decompression bomb), one decoder shared by the
dataset build and every reader (a damaged JPEG Pillow takes, EXIF orientation), a shard holding a
key twice, names that are not UTF-8, a gallery changed after indexing (noticed, and never shown
as another image), and `add` of a folder that gained two files (embeds two)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from retrieving import Served, cli, ok, refused

from itself.data import transforms as T
from itself.data.catalog import iter_shard
from itself.errors import DataError
from itself.retrieve import Index
from shards.imaging import decode_array, failure_reason, prepare_image


def _jpeg(pixels: np.ndarray, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _gallery(photos: Path, to: Path, n: int = 4) -> Path:
    to.mkdir(parents=True)
    for p in sorted(photos.iterdir())[:n]:
        shutil.copy(p, to / p.name)
    return to


# ----------------------------------------------------------------------------------- the builder's rules


def test_a_folder_gallery_follows_the_dataset_builders_rules(untrained_model, photos, tmp_path):
    g = _gallery(photos, tmp_path / "g", 3)
    first = sorted(p.name for p in g.iterdir())
    outside = tmp_path / "outside.jpg"
    shutil.copy(photos / first[0], outside)
    (g / "link-out.jpg").symlink_to(outside)  # a link leaving the gallery: left out, as the builder does
    (g / "link-in.jpg").symlink_to(g / first[1])  # a link inside it: indexed, as the builder does
    os.mkfifo(g / "fifo.jpg")  # never opened for reading (it would block forever)
    with open(g / "big.jpg", "wb") as f:  # 65 MiB (sparse): over the builder's 64 MiB
        f.truncate(65 << 20)
    bomb = bytearray(_jpeg(_noise(16, 16)))
    sof = bomb.index(b"\xff\xc0")  # the frame header: height and width as 16-bit numbers
    bomb[sof + 5:sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    (g / "bomb.jpg").write_bytes(bomb)
    start = time.monotonic()
    _, out, err = ok(cli("index", "--model", untrained_model, "--gallery", g, "--out", tmp_path / "index"))
    assert time.monotonic() - start < 120
    assert "indexed 4 images (1 unreadable skipped)" in out  # 3 files and the inner link; the bomb skipped
    logged = out + err  # (what the user sees: the command routes its log records to the console)
    assert "link-out.jpg': a link leaving the gallery" in logged and "fifo.jpg': not a regular file" in logged
    assert "big.jpg': larger than 64 MiB" in logged
    index = Index(str(tmp_path / "index"))
    assert sorted(i["name"] for i in index.items) == sorted([*first, "link-in.jpg"])
    assert index.info["batches"][0]["refused"] == 3
    # At read time too: an indexed file turned into a link leaving the gallery (same bytes) is not shown.
    row = next(r for r in range(len(index)) if index.item(r)["name"] == first[2])
    (g / first[2]).unlink()
    (g / first[2]).symlink_to(outside.with_name("copy.jpg"))
    shutil.copy(photos / first[2], outside.with_name("copy.jpg"))
    with Served(tmp_path / "index") as server:
        assert server.get(f"/thumb/{row}.png")[0] == 404
        assert server.get(f"/thumb/{(row + 1) % 4}.png")[0] == 200


def test_the_build_and_every_reader_share_one_decoder():
    pixels = _noise(64, 48)
    good = _jpeg(pixels)
    # A JPEG with damaged entropy data that Pillow decodes: the build took it, the training reader
    # (libjpeg-turbo alone) dropped it. Now both take it, with the same pixels.
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    damaged = bytes(damaged)
    prepared = prepare_image(damaged)
    assert prepared.ext == "jpg" and (prepared.width, prepared.height) == (48, 64)
    assert T.decode(prepared.data).shape == (3, 64, 48)
    assert np.array_equal(T.decode(prepared.data).permute(1, 2, 0).numpy(), decode_array(damaged))
    # A truncated one is refused by both.
    for decode in (prepare_image, T.decode):
        with pytest.raises(Exception):  # noqa: B017, PT011 - whichever decoder error: it must not decode
            decode(good[: len(good) // 2])
    # A 30000 x 30000 header (a decompression bomb) is refused from its header, by both.
    bomb = bytearray(good)
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5:sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    start = time.monotonic()
    with pytest.raises(Image.DecompressionBombError, match="30000x30000 pixels"):
        T.decode(bytes(bomb))
    with pytest.raises(Image.DecompressionBombError) as e:
        prepare_image(bytes(bomb))
    assert failure_reason(e.value)[0] == "image file too large" and time.monotonic() - start < 5


def _progressive_jpeg_of_scans(side: int, repeats: int) -> bytes:
    """A valid progressive JPEG whose last scan comes `repeats` more times: each is one more pass
    over every pixel for the decoder (a CPU bomb a few hundred bytes per scan)."""
    import struct

    out = io.BytesIO()
    Image.new("L", (side, side), 128).save(out, "JPEG", progressive=True, quality=90)
    data, i, last = out.getvalue(), 2, None
    while data[i + 1] != 0xD9:  # (markers, up to EOI)
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if data[i + 1] != 0xDA:
            i += 2 + length
            continue
        j = i + 2 + length  # (a scan's entropy data runs to the next marker that is not stuffing or RST)
        while not (data[j] == 0xFF and data[j + 1] != 0 and not 0xD0 <= data[j + 1] <= 0xD7):
            j += 1
        last, i = (i, j), j
    start, end = last
    return data[:end] + data[start:end] * repeats + data[end:]


def test_a_file_of_another_format_or_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(tmp_path, monkeypatch):
    # Pillow picks its decoder from the bytes: PostScript named .png would run Ghostscript (a `gs`
    # first on PATH here writes a marker if it ever runs). A progressive JPEG of 2,000 scans takes
    # minutes to decode. Both are refused by the build and by every reader, at once.
    marker, bin_dir = tmp_path / "gs-ran", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    eps = io.BytesIO()
    Image.new("RGB", (20, 60), (200, 10, 10)).save(eps, "EPS")
    assert _progressive_jpeg_of_scans(64, 0)[:2] == b"\xff\xd8" and decode_array(_progressive_jpeg_of_scans(64, 50)).shape == (64, 64, 3)
    scan_bomb = _progressive_jpeg_of_scans(64, 2000)
    start = time.monotonic()
    for decode in (prepare_image, T.decode, decode_array):
        with pytest.raises(Exception, match="cannot identify image file") as e:
            decode(eps.getvalue())
        assert failure_reason(e.value)[0] == "unreadable or truncated image"
        with pytest.raises(Image.DecompressionBombError, match="a JPEG of 20\\d\\d scans, more than the 100") as e:
            decode(scan_bomb)
        assert failure_reason(e.value)[0] == "image file too large"
    assert not marker.exists() and time.monotonic() - start < 5


def test_an_image_that_would_be_stored_larger_than_readers_take_is_refused(monkeypatch):
    # A 16-bit image (or an EXIF-rotated photo) is stored re-encoded as PNG: one larger than an image
    # may be would be refused by every reader of the shard (the limit scaled down to 1 KB here).
    import shards.imaging

    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (64, 64)).astype(np.uint16)).save(noise, "PNG")
    assert prepare_image(noise.getvalue()).ext == "png"
    monkeypatch.setattr(shards.imaging, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(Image.DecompressionBombError, match="stored as PNG it takes \\d+ bytes, more than the 1000") as e:
        prepare_image(noise.getvalue())
    assert failure_reason(e.value)[0] == "image file too large"


def test_exif_orientation_is_applied_at_build_and_at_read():
    stored = _noise(32, 48, seed=1)  # as the camera stored it: sideways
    rotated = _jpeg(stored, orientation=6)  # "turn 90 degrees clockwise to view"
    plain = T.decode(_jpeg(stored)).permute(1, 2, 0).numpy()  # the same JPEG stream without the tag
    upright = np.rot90(plain, -1)
    assert np.array_equal(T.decode(rotated).permute(1, 2, 0).numpy(), upright)
    assert np.array_equal(decode_array(rotated), upright)
    # The builder stores it upright (losslessly): the training reader reads the same pixels.
    prepared = prepare_image(rotated)
    assert prepared.ext == "png" and "EXIF orientation 6 applied" in prepared.converted
    assert (prepared.width, prepared.height) == (32, 48)
    assert np.array_equal(T.decode(prepared.data).permute(1, 2, 0).numpy(), upright)


def test_an_exif_rotated_photo_in_a_folder_gallery_is_indexed_upright(untrained_model, tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    stored = _noise(16, 48, seed=2)  # sideways: upright it is 48 x 16, the model's input shape
    (g / "rotated.jpg").write_bytes(_jpeg(stored, orientation=8))
    Image.fromarray(decode_array((g / "rotated.jpg").read_bytes())).save(g / "upright.png")
    Image.fromarray(stored).save(g / "sideways.png")
    ok(cli("index", "--model", untrained_model, "--gallery", g, "--out", tmp_path / "index"))
    index = Index(str(tmp_path / "index"))
    rows = {index.item(r)["name"]: r for r in range(len(index))}
    glob, grab = index.store.rows(np.array([rows["rotated.jpg"], rows["upright.png"], rows["sideways.png"]]))
    assert np.allclose(glob[0], glob[1], atol=1e-5) and np.allclose(grab[0], grab[1], atol=1e-5)
    assert not np.allclose(glob[0], glob[2], atol=1e-3)  # (the orientation matters to the model)


# ----------------------------------------------------------------------------------- shards


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_shard_with_a_key_twice_is_refused(untrained_model, small_dataset, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(next((small_dataset / "test").glob("*.tar")), shards / "test-000000.tar")
    ok(cli("index", "--model", untrained_model, "--gallery", shards / "test-000000.tar", "--out", tmp_path / "index"))
    index = Index(str(tmp_path / "index"))
    key = index.item(0)["key"]
    # The key again, after other samples, with another image: a scan shows the first, a member
    # index the last. Both readers now refuse the shard, naming it and the key.
    with tarfile.open(shards / "test-000000.tar", "a") as tar:
        _add_member(tar, f"{key}.jpg", _jpeg(_noise(48, 16, seed=3)))
        _add_member(tar, f"{key}.json", json.dumps({"pid": 0, "captions": ["x"]}).encode())
    with pytest.raises(DataError, match=f"key '{key}' appears twice"):
        list(iter_shard(str(shards / "test-000000.tar")))
    refused(cli("index", "--model", untrained_model, "--gallery", shards / "test-000000.tar", "--out", tmp_path / "i2"),
            "test-000000.tar", f"key '{key}' appears twice")
    refused(cli("report", "--index", tmp_path / "index", "--text", "a man", "--top-k", "8", "--out", tmp_path / "r"),
            "test-000000.tar", f"key '{key}' appears twice")
    with Served(tmp_path / "index") as server:
        assert server.get("/thumb/0.png")[0] == 404
        (shards / "test-000000.tar").unlink()
        os.mkfifo(shards / "test-000000.tar")  # (a tar reader would wait on it forever)
        assert server.get("/thumb/1.png")[0] == 404


# ----------------------------------------------------------------------------------- names, changes, add


def test_file_names_that_are_not_utf8_are_shown(untrained_model, photos, tmp_path):
    g = _gallery(photos, tmp_path / "g", 2)
    first = sorted(g.iterdir())[0]
    os.rename(first, os.path.join(os.fsencode(g), b"caf\xe9-\xff.jpg"))  # (Latin-1 bytes: not UTF-8)
    ok(cli("index", "--model", untrained_model, "--gallery", g, "--out", tmp_path / "index"))
    _, out, _ = ok(cli("query", "--index", tmp_path / "index", "--text", "a man"))
    assert "caf\ufffd-\ufffd.jpg" in out
    ok(cli("report", "--index", tmp_path / "index", "--text", "a man", "--out", tmp_path / "r"))
    page = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert "caf\ufffd-\ufffd.jpg" in page and page.count("<figure") == 2 and page.endswith("</html>")
    with Served(tmp_path / "index") as server:
        status, body = server.get("/?q=a+man")
        assert status == 200 and "caf\ufffd-\ufffd.jpg" in body.decode("utf-8")
        assert [server.get(f"/thumb/{r}.png")[0] for r in range(2)] == [200, 200]


def test_a_changed_gallery_is_noticed_and_never_shown(untrained_model, photos, tmp_path):
    g = _gallery(photos, tmp_path / "g", 4)
    ok(cli("index", "--model", untrained_model, "--gallery", g, "--out", tmp_path / "index"))
    index = Index(str(tmp_path / "index"))
    names = [index.item(r)["name"] for r in range(4)]
    shutil.copy(g / names[1], g / names[0])  # another person's image under row 0's name
    (g / names[3]).unlink()
    _, _, err = ok(cli("query", "--index", tmp_path / "index", "--text", "a man"))
    assert "warning: the gallery changed since it was indexed" in err
    refused(cli("report", "--index", tmp_path / "index", "--text", "a man", "--top-k", "4", "--out", tmp_path / "r"),
            "changed since it was indexed")
    assert not (tmp_path / "r" / "index.html").exists()
    with Served(tmp_path / "index") as server:
        assert [server.get(f"/thumb/{r}.png")[0] for r in range(4)] == [410, 200, 200, 404]


def test_add_of_a_folder_that_gained_two_files_embeds_two(untrained_model, photos, small_dataset, tmp_path):
    g = _gallery(photos, tmp_path / "g", 6)
    ok(cli("index", "--model", untrained_model, "--gallery", g, "--out", tmp_path / "index"))
    with tarfile.open(sorted((small_dataset / "val").glob("*.tar"))[0]) as t:
        new = [m for m in t.getmembers() if m.name.endswith(".jpg")][:2]
        for m in new:
            (g / f"new-{m.name}").write_bytes(t.extractfile(m).read())
    shutil.copy(sorted(g.iterdir())[0], g / "copy-of-an-indexed-image.jpg")
    _, out, _ = ok(cli("add", "--index", tmp_path / "index", "--gallery", g))
    assert "added 2 images (0 unreadable skipped)" in out and "8 images now" in out
    assert "7 already in the index skipped (6 indexed files or shards, 1 copies of indexed images)" in out
    index = Index(str(tmp_path / "index"))
    assert sorted(index.item(r)["name"] for r in range(6, 8)) == sorted(f"new-{m.name}" for m in new)
    refused(cli("add", "--index", tmp_path / "index", "--gallery", g), "nothing to add", "already in the index")
    assert sorted(p.name for p in (tmp_path / "index" / "batches").iterdir()) == ["000", "001"]

