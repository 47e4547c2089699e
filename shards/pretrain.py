"""A synthetic person pre-training corpus, in WebPerson's published layout, through the real reader.

`itself-shards build --dataset synthetic-pretrain --out DIR [--pairs N]` draws pedestrians as the
embedded benchmark does (`shards.synthetic`: same attribute vocabulary and drawing code) but
from other random streams and with other caption templates and phrasings (three styles, after
the corpora's: an attribute-union sentence as SYNTH-PEDES's prompt captions, a lower-case
description as MALS's, a two-sentence description as WebPerson's MLLM captions). Like WebPerson,
each image is its own pseudo-identity with two captions (two different styles): `--pairs N`
image-caption pairs are N/2 images.

The corpus is written as WebPerson's Hugging Face release lays it out -- `data/train-NNNNN-of-
NNNNN.parquet` with columns `image` (struct of `bytes` and `path`), `image_path`, `caption1`,
`caption2` -- into a folder beside the output, then converted by the `webperson` reader
(`shards.corpus_build`), so the real reader is exercised end to end; the raw folder is removed
when the dataset is written.

No identity of the corpus has the attributes of a val or test identity of the default embedded
benchmark (`SyntheticSpec()`): those are generated and excluded. What the corpus shares with the
benchmark is the attribute vocabulary and the drawing code (so pre-training transfers), not people.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .chunking import unique_name
from .corpus_build import CorpusOptions, convert_corpus
from .converters import worker_init
from .errors import BuildError
from .synthetic import SYNONYMS, Person, SyntheticSpec, draw_person, make_people, people_of

ROWS_PER_FILE = 5_000
ROW_GROUP = 100  # rows per Parquet row group (as Hugging Face writes image datasets)

# Phrasings the benchmark's captions never use, added to its synonyms.
MORE_WORDS = {
    "t-shirt": ["tee shirt", "short-sleeve top"], "jacket": ["windbreaker", "zip-up jacket"],
    "hoodie": ["hooded top"], "sweater": ["pullover", "knit sweater"], "dress": ["one-piece dress", "frock"],
    "trousers": ["slacks", "long pants"], "shorts": ["short pants"], "skirt": ["knee-length skirt"],
    "jeans": ["denims"], "sneakers": ["running shoes", "canvas shoes"], "boots": ["ankle boots"],
    "sandals": ["open shoes"], "backpack": ["knapsack", "school bag"], "handbag": ["tote", "hand bag"],
    "shoulder bag": ["satchel", "crossbody bag"], "cap": ["peaked cap"], "beanie": ["woolly hat"],
    "grey": ["ash-grey"], "navy": ["navy blue"], "brown": ["chocolate"], "white": ["off-white", "white"],
}
PATTERN_WORDS = {"plain": ["", "plain ", "solid "], "striped": ["striped ", "stripy "],
                 "checked": ["plaid ", "checkered "], "dotted": ["polka-dot ", "spotted "]}


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
    """Size and shape of the synthetic pre-training corpus (`--dataset synthetic-pretrain` flags)."""

    pairs: int = 100_000
    """Image-caption pairs: two captions per image, so pairs / 2 images (pseudo-identities)."""
    image_size: tuple[int, int] = (192, 64)
    """Height x width of the drawn images (as the embedded benchmark's)."""
    twin_fraction: float = 0.3
    """Share of near twins (another person of the corpus but one detail): hard negatives."""
    seed: int = 0

    @property
    def images(self) -> int:
        return math.ceil(self.pairs / 2)

    def validate(self) -> None:
        if isinstance(self.pairs, bool) or not isinstance(self.pairs, int) or not 4 <= self.pairs <= 100_000_000:
            raise BuildError(f"--pairs: must be an integer in 4..100000000, got {self.pairs!r}")
        try:
            SyntheticSpec(image_size=self.image_size, twin_fraction=self.twin_fraction, seed=self.seed).validate()
        except ValueError as e:
            raise BuildError(str(e)) from None


def _word(word: str, rng: random.Random) -> str:
    return rng.choice(SYNONYMS.get(word, [word]) + MORE_WORDS.get(word, []))


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _parts(p: Person, rng: random.Random) -> dict:
    w = lambda name: _word(name, rng)  # noqa: E731
    hair_colour = "blond" if p.hair_colour == "yellow" else w(p.hair_colour)
    return {
        "who": p.gender, "pron": "he" if p.gender == "man" else "she", "poss": "his" if p.gender == "man" else "her",
        "upper": f"{rng.choice(PATTERN_WORDS[p.pattern])}{w(p.upper_colour)} {w(p.upper)}",
        "lower": f"{w(p.lower_colour)} {w(p.lower)}", "shoes": f"{w(p.shoes_colour)} {w(p.shoes)}",
        "hair": f"{p.hair_style} {hair_colour} hair",
        "hat": None if p.hat == "none" else f"{w(p.hat_colour)} {w(p.hat)}",
        "bag": None if p.bag == "none" else f"{w(p.bag_colour)} {w(p.bag)}",
    }


def _union(p: Person, rng: random.Random) -> str:
    """An attribute-union sentence (after SYNTH-PEDES's prompt captions)."""
    x = _parts(p, rng)
    text = f"A {x['who']} with {x['hair']} is wearing {_a(x['upper'])} with {x['lower']} and a pair of {x['shoes']}"
    if x["hat"]:
        text += f", topped with {_a(x['hat'])}"
    if x["bag"]:
        text += f", and has {_a(x['bag'])}"
    return text + "."


def _plain(p: Person, rng: random.Random) -> str:
    """A lower-case running description (after MALS's generated captions)."""
    x = _parts(p, rng)
    who = rng.choice({"man": ["a young man", "a guy", "an adult man"], "woman": ["a young woman", "a lady", "a girl"]}[p.gender])
    scene = rng.choice(["walking down the street", "standing on the sidewalk", "crossing a square", "waiting outside"])
    text = f"{who} in {_a(x['upper'])} and {x['lower']} {scene}"
    if x["bag"]:
        text += f" with {_a(x['bag'])}"
    if x["hat"]:
        text += f" wearing {_a(x['hat'])}"
    return text + f" and {x['shoes']}"


def _described(p: Person, rng: random.Random) -> str:
    """Two sentences about the person (after WebPerson's MLLM captions)."""
    x = _parts(p, rng)
    first = (f"The image shows {_a(x['who'])} dressed in {_a(x['upper'])} paired with {x['lower']} and "
             f"{x['shoes']}.")
    extras = [f"{x['pron'].capitalize()} has {x['hair']}"]
    if x["hat"]:
        extras.append(f"{x['pron']} is wearing {_a(x['hat'])}")
    if x["bag"]:
        extras.append(f"{x['pron']} carries {_a(x['bag'])} with {x['poss']} belongings")
    return first + " " + ", and ".join(extras) + "."


STYLES = (_union, _plain, _described)


def captions_of(p: Person, rng: random.Random) -> tuple[str, str]:
    """Two captions of two different styles."""
    a, b = rng.sample(STYLES, 2)
    return a(p, rng), b(p, rng)


def _write_part(folder: Path, spec: PretrainSpec, k: int, parts: int, exclude: frozenset) -> None:
    """Part `k` of the raw corpus (a pure function of the seed and k), written atomically."""
    final = folder / "data" / f"train-{k:05d}-of-{parts:05d}.parquet"
    if final.exists():
        return
    rng = random.Random(f"itself-synthetic-pretrain/{spec.seed}/{k}")
    first = k * ROWS_PER_FILE
    count = min(ROWS_PER_FILE, spec.images - first)
    rows = []
    for i, person in enumerate(make_people(count, spec.twin_fraction, rng, exclude)):
        buf = io.BytesIO()
        draw_person(person, rng, spec.image_size).save(buf, format="JPEG", quality=90)
        name = f"{first + i:08d}.jpg"
        c1, c2 = captions_of(person, rng)
        rows.append({"image": {"bytes": buf.getvalue(), "path": name}, "image_path": f"images/{k:05d}/{name}",
                     "caption1": c1, "caption2": c2})
    features = {"image": {"_type": "Image"}, "image_path": {"dtype": "string", "_type": "Value"},
                "caption1": {"dtype": "string", "_type": "Value"}, "caption2": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("image_path", pa.string()), ("caption1", pa.string()), ("caption2", pa.string())],
                       metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    tmp = final.with_name(unique_name(final.name))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, row_group_size=ROW_GROUP)
    os.replace(tmp, final)


def write_raw_corpus(folder: Path, spec: PretrainSpec, workers: int = 1) -> None:
    """The raw corpus in WebPerson's layout under `folder` (parts already written are kept)."""
    stamp = folder / "spec.json"
    wanted = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    if folder.exists() and (not stamp.exists() or stamp.read_text() != wanted):
        shutil.rmtree(folder)  # (of another spec, or of a run killed before its stamp)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)
    benchmark = people_of(SyntheticSpec())
    exclude = frozenset(benchmark.get("val", set()) | benchmark.get("test", set()))
    parts = math.ceil(spec.images / ROWS_PER_FILE)
    if workers <= 1 or parts == 1:
        for k in range(parts):
            _write_part(folder, spec, k, parts, exclude)
        return
    with ProcessPoolExecutor(min(workers, parts), mp_context=get_context("fork"), initializer=worker_init) as pool:
        for f in [pool.submit(_write_part, folder, spec, k, parts, exclude) for k in range(parts)]:
            f.result()


def build_synthetic_pretrain(out, spec: PretrainSpec | None = None, *, workers: int | None = None,
                             options: CorpusOptions | None = None, overwrite: bool = False,
                             progress: bool = True) -> dict:
    """Generate the corpus beside `out` and convert it there with the webperson reader."""
    spec = spec or PretrainSpec()
    spec.validate()
    out_path = Path(os.path.realpath(out))
    raw = out_path.parent / f".{out_path.name}.pretrain-raw"
    workers = workers or os.cpu_count() or 1
    write_raw_corpus(raw, spec, workers)
    options = dataclasses.replace(options or CorpusOptions(), name="synthetic-pretrain",
                                  extra={"generated": {"kind": "synthetic-pretrain", **dataclasses.asdict(spec)}})
    info = convert_corpus("webperson", raw, out, options, workers=workers, overwrite=overwrite, progress=progress)
    shutil.rmtree(raw, ignore_errors=True)
    return info
