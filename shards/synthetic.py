"""Embedded synthetic dataset: procedurally drawn pedestrians with fine-grained attributes.

Every identity is a set of attributes (hair, hat, upper garment type/colour/pattern, lower
garment, shoes, bag). Each image draws that person with a different pose, scale, background,
lighting and sometimes a partial occlusion; each image gets two captions from varied templates
and synonyms. A fraction of identities are *near twins*: a copy of another identity of the same
split that differs in one small detail (bag colour, shoes, hat), which only local alignment
can tell apart. Splits are identity-disjoint, as in CUHK-PEDES. Everything is a pure function
of the seed.
"""

from __future__ import annotations

import dataclasses
import io
import random
from typing import Iterator

from PIL import Image, ImageDraw, ImageEnhance

from .writer import Record

COLOURS = {
    "black": (25, 25, 28), "white": (235, 235, 230), "grey": (128, 128, 128),
    "red": (200, 30, 35), "blue": (35, 70, 190), "green": (40, 150, 60),
    "yellow": (230, 200, 40), "brown": (115, 75, 40), "pink": (235, 130, 170),
    "purple": (120, 50, 150), "orange": (240, 130, 30), "navy": (20, 30, 90),
}
SYNONYMS = {
    "grey": ["grey", "gray"], "navy": ["navy", "dark blue"], "brown": ["brown", "tan"],
    "t-shirt": ["t-shirt", "tee", "short-sleeved shirt"], "jacket": ["jacket", "coat"],
    "hoodie": ["hoodie", "hooded sweatshirt"], "dress": ["dress"], "sweater": ["sweater", "jumper"],
    "trousers": ["trousers", "pants"], "shorts": ["shorts"], "skirt": ["skirt"],
    "jeans": ["jeans", "denim pants"], "sneakers": ["sneakers", "trainers", "sports shoes"],
    "boots": ["boots"], "sandals": ["sandals"], "backpack": ["backpack", "rucksack"],
    "handbag": ["handbag", "purse"], "shoulder bag": ["shoulder bag", "messenger bag"],
    "cap": ["cap", "baseball cap"], "beanie": ["beanie", "knit hat"],
}
UPPER = ["t-shirt", "jacket", "hoodie", "sweater", "dress"]
PATTERNS = ["plain", "striped", "checked", "dotted"]
LOWER = ["trousers", "shorts", "skirt", "jeans"]
SHOES = ["sneakers", "boots", "sandals"]
BAGS = ["none", "backpack", "handbag", "shoulder bag"]
HATS = ["none", "cap", "beanie"]
HAIR_STYLES = ["short", "long"]
HAIR_COLOURS = ["black", "brown", "yellow", "grey"]
SKIN = [(240, 200, 170), (200, 150, 110), (140, 95, 60), (90, 60, 40)]
# Details a near twin may differ in: (attribute, choices).
TWIN_DETAILS = (("bag_colour", list(COLOURS)), ("shoes_colour", list(COLOURS)), ("hat", HATS))


@dataclasses.dataclass(frozen=True)
class Person:
    """The attributes that define one synthetic identity."""

    gender: str
    skin: int
    hair_style: str
    hair_colour: str
    hat: str
    hat_colour: str
    upper: str
    upper_colour: str
    pattern: str
    pattern_colour: str
    lower: str
    lower_colour: str
    shoes: str
    shoes_colour: str
    bag: str
    bag_colour: str


def random_person(rng: random.Random) -> Person:
    gender = rng.choice(["man", "woman"])
    upper = rng.choice(UPPER if gender == "woman" else UPPER[:-1])
    colours = list(COLOURS)
    return Person(
        gender=gender, skin=rng.randrange(len(SKIN)),
        hair_style=rng.choice(HAIR_STYLES), hair_colour=rng.choice(HAIR_COLOURS),
        hat=rng.choice(HATS), hat_colour=rng.choice(colours),
        upper=upper, upper_colour=rng.choice(colours),
        pattern=rng.choice(PATTERNS), pattern_colour=rng.choice(colours),
        lower=rng.choice(LOWER if gender == "woman" else ["trousers", "shorts", "jeans"]),
        lower_colour=rng.choice(colours),
        shoes=rng.choice(SHOES), shoes_colour=rng.choice(colours),
        bag=rng.choice(BAGS[1:]), bag_colour=rng.choice(colours),
    )


def near_twin(person: Person, rng: random.Random) -> Person:
    """A copy of `person` that differs in exactly one small, visible detail."""
    field, choices = rng.choice(TWIN_DETAILS)
    current = getattr(person, field)
    return dataclasses.replace(person, **{field: rng.choice([c for c in choices if c != current])})


def make_people(num: int, twin_fraction: float, rng: random.Random, exclude=frozenset()) -> list[Person]:
    """`num` distinct identities, about `twin_fraction` of them near twins of an earlier one; none
    of them in `exclude`."""
    people: list[Person] = []
    seen: set[Person] = set()
    while len(people) < num:
        if people and rng.random() < twin_fraction:
            candidate = near_twin(rng.choice(people), rng)
        else:
            candidate = random_person(rng)
        if candidate not in seen and candidate not in exclude:
            seen.add(candidate)
            people.append(candidate)
    return people


# ----------------------------------------------------------------------------------- drawing


def _shade(rgb: tuple[int, int, int], rng: random.Random, spread: int = 18) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-spread, spread))) for c in rgb)


def _rect(draw: ImageDraw.ImageDraw, box, **style) -> None:
    """A rectangle from any two opposite corners (PIL wants them ordered)."""
    x0, y0, x1, y1 = box
    draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], **style)


def _background(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    top, bottom = _shade((150, 160, 170), rng, 60), _shade((110, 105, 100), rng, 50)
    for y in range(h):
        a = y / max(1, h - 1)
        draw.line([(0, y), (w, y)], fill=tuple(int(t * (1 - a) + b * a) for t, b in zip(top, bottom)))
    for _ in range(rng.randint(0, 4)):  # street clutter: walls, windows, poles
        x0, y0 = rng.randrange(w), rng.randrange(h)
        _rect(draw, [x0, y0, x0 + rng.randint(3, w // 3), y0 + rng.randint(3, h // 3)],
                       fill=_shade((120, 120, 120), rng, 70))


def _patterned_rect(draw, box, colour, pattern, pattern_colour):
    _rect(draw, box, fill=colour)
    x0, y0, x1, y1 = box
    step = max(3, (x1 - x0) // 5)
    if pattern == "striped":
        for y in range(y0 + 1, y1, step):
            draw.line([(x0, y), (x1, y)], fill=pattern_colour, width=max(1, step // 3))
    elif pattern == "checked":
        for y in range(y0, y1, step):
            for x in range(x0 + ((y - y0) // step % 2) * step, x1, 2 * step):
                _rect(draw, [x, y, min(x + step - 1, x1), min(y + step - 1, y1)], fill=pattern_colour)
    elif pattern == "dotted":
        for y in range(y0 + step // 2, y1, step):
            for x in range(x0 + step // 2, x1, step):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=pattern_colour)


def draw_person(p: Person, rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """One image of person `p`: pose, scale, background, lighting and occlusion vary with `rng`."""
    h, w = size
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    _background(d, w, h, rng)

    s = rng.uniform(0.8, 1.0)  # scale of the person in the frame
    ph = int(h * 0.92 * s)
    cx = w // 2 + rng.randint(-w // 10, w // 10)
    top = (h - ph) // 2 + rng.randint(-h // 30, h // 30)
    u = ph / 100.0  # body unit: the figure is laid out on a 100-unit height
    col = lambda name: _shade(COLOURS[name], rng, 12)  # noqa: E731
    facing = rng.choice([-1, 1])  # which side the bag hangs on
    stride = rng.uniform(0, 7) * u

    # legs and lower garment
    hip, knee, ankle = top + 52 * u, top + 72 * u, top + 92 * u
    leg_w = 7 * u
    skin = _shade(SKIN[p.skin], rng, 8)
    for side in (-1, 1):
        x = cx + side * (5 * u + side * stride / 2)
        _rect(d, [x - leg_w / 2, hip, x + leg_w / 2, ankle], fill=skin)
        bottom = {"shorts": knee - 4 * u, "skirt": knee - 2 * u}.get(p.lower, ankle)
        if p.lower != "skirt":
            _rect(d, [x - leg_w / 2 - u, hip, x + leg_w / 2 + u, bottom], fill=col(p.lower_colour))
        shoe_h = 7 * u if p.shoes == "boots" else 4 * u
        shoe = col(p.shoes_colour)
        _rect(d, [x - leg_w / 2 - u, ankle - shoe_h + 4 * u, x + leg_w / 2 + 2 * u, ankle + 4 * u], fill=shoe)
    if p.lower == "skirt":
        d.polygon([(cx - 9 * u, hip), (cx + 9 * u, hip), (cx + 14 * u, knee), (cx - 14 * u, knee)],
                  fill=col(p.lower_colour))

    # torso, arms, upper garment
    shoulder = top + 20 * u
    torso_bottom = hip + (16 * u if p.upper == "dress" else (6 * u if p.upper == "jacket" else 2 * u))
    upper = col(p.upper_colour)
    _patterned_rect(d, [int(cx - 11 * u), int(shoulder), int(cx + 11 * u), int(torso_bottom)], upper,
                    p.pattern, col(p.pattern_colour))
    sleeve_end = shoulder + (12 * u if p.upper == "t-shirt" else 30 * u)
    for side in (-1, 1):
        swing = rng.uniform(-4, 4) * u
        ax = cx + side * 14 * u
        d.line([(ax, shoulder + 2 * u), (ax + swing, shoulder + 32 * u)], fill=skin, width=max(2, int(5 * u)))
        d.line([(ax, shoulder + 2 * u), (ax + swing * (sleeve_end - shoulder) / (30 * u), sleeve_end)],
               fill=upper, width=max(2, int(6 * u)))
    if p.upper == "hoodie":
        d.ellipse([cx - 8 * u, shoulder - 6 * u, cx + 8 * u, shoulder + 4 * u], outline=upper, width=max(1, int(2 * u)))

    # head, hair, hat
    head_r = 7 * u
    hy = top + 11 * u
    hair = col(p.hair_colour)
    if p.hair_style == "long":
        _rect(d, [cx - head_r - u, hy - head_r, cx + head_r + u, hy + head_r + 8 * u], fill=hair)
    d.ellipse([cx - head_r, hy - head_r, cx + head_r, hy + head_r], fill=skin)
    d.chord([cx - head_r, hy - head_r - u, cx + head_r, hy + head_r], 180, 360, fill=hair)
    if p.hat == "cap":
        d.chord([cx - head_r, hy - head_r - 2 * u, cx + head_r, hy + head_r - 3 * u], 180, 360, fill=col(p.hat_colour))
        _rect(d, [cx, hy - 3 * u, cx + facing * (head_r + 4 * u), hy - 2 * u], fill=col(p.hat_colour))
    elif p.hat == "beanie":
        d.ellipse([cx - head_r, hy - head_r - 4 * u, cx + head_r, hy + 0 * u], fill=col(p.hat_colour))

    # bag
    bag = col(p.bag_colour)
    if p.bag == "backpack":
        _rect(d, [cx + facing * 9 * u, shoulder + 2 * u, cx + facing * 17 * u, shoulder + 24 * u], fill=bag)
    elif p.bag == "handbag":
        bx = cx + facing * 16 * u
        _rect(d, [bx - 4 * u, shoulder + 28 * u, bx + 4 * u, shoulder + 36 * u], fill=bag)
    elif p.bag == "shoulder bag":
        d.line([(cx - facing * 10 * u, shoulder), (cx + facing * 12 * u, hip - 2 * u)], fill=bag, width=max(1, int(2 * u)))
        _rect(d, [cx + facing * 9 * u, hip - 6 * u, cx + facing * 19 * u, hip + 4 * u], fill=bag)

    # occasional partial occlusion (a passer-by, a pole, a car)
    if rng.random() < 0.25:
        ow, oh = rng.randint(w // 6, w // 3), rng.randint(h // 6, h // 3)
        ox = rng.choice([0, w - ow])
        oy = rng.randint(h // 3, h - oh)
        _rect(d, [ox, oy, ox + ow, oy + oh], fill=_shade((90, 90, 95), rng, 60))

    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))  # lighting
    return img


# ----------------------------------------------------------------------------------- captions


def _say(word: str, rng: random.Random) -> str:
    return rng.choice(SYNONYMS.get(word, [word]))


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(p: Person, rng: random.Random) -> str:
    """One caption of `p`, from varied templates, synonyms and clause orders."""
    c = lambda name: _say(name, rng)  # noqa: E731
    pattern = {"plain": "", "striped": f" with {c(p.pattern_colour)} stripes",
               "checked": f" with a {c(p.pattern_colour)} checked pattern",
               "dotted": f" with {c(p.pattern_colour)} dots"}[p.pattern]
    upper = f"{_article(c(p.upper_colour) + ' ' + c(p.upper))}{pattern}"
    lower = c(p.lower)
    lower = f"{_article(c(p.lower_colour) + ' ' + lower)}" if p.lower in ("skirt",) else f"{c(p.lower_colour)} {lower}"
    shoes = f"{c(p.shoes_colour)} {c(p.shoes)}"
    hair = f"{p.hair_style} {c(p.hair_colour) if p.hair_colour != 'yellow' else 'blond'} hair"
    subject = rng.choice({"man": ["a man", "a young man", "the man", "a male pedestrian"],
                          "woman": ["a woman", "a young woman", "the woman", "a female pedestrian"]}[p.gender])
    pron = "he" if p.gender == "man" else "she"
    clauses = [f"{rng.choice(['wearing', 'dressed in', 'in'])} {upper}",
               f"{rng.choice(['wearing', 'with'])} {lower}" if p.upper != "dress" else f"over {lower}",
               f"{rng.choice(['and', 'with'])} {shoes}"]
    extras = [f"{pron} has {hair}"]
    if p.hat != "none":
        extras.append(f"{pron} wears {_article(c(p.hat_colour) + ' ' + c(p.hat))}")
    if p.bag != "none":
        extras.append(f"{pron} {rng.choice(['carries', 'is carrying', 'has'])} {_article(c(p.bag_colour) + ' ' + c(p.bag))}")
    rng.shuffle(extras)
    if rng.random() < 0.5:
        text = f"{subject} {' '.join(clauses)}. " + ". ".join(extras) + "."
    else:
        text = f"{subject} with {hair} is {' '.join(clauses)}. " + ". ".join(e for e in extras if "hair" not in e) + "."
    return ". ".join(part.strip()[0].upper() + part.strip()[1:] for part in text.split(". ") if part.strip())


# ----------------------------------------------------------------------------------- dataset


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Size and shape of the synthetic dataset (the `shards build --dataset synthetic` flags)."""

    num_ids: int = 240
    """Identities over all splits; split train/val/test as 2/3, 1/6, 1/6 (identity-disjoint)."""
    images_per_id: int = 4
    """Images drawn per identity (each with `captions_per_image` captions)."""
    captions_per_image: int = 2
    image_size: tuple[int, int] = (192, 64)
    """Height x width of the drawn images (the pipeline resizes to the training size)."""
    twin_fraction: float = 0.3
    """Share of identities that are near twins of another identity of the same split."""
    seed: int = 0

    def validate(self) -> None:
        """ValueError naming the flag of the first field out of range."""
        def whole(flag: str, value, lo: int, hi: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{flag}: must be an integer in {lo}..{hi}, got {value!r}")

        whole("--num-ids", self.num_ids, 3, 10_000_000)
        whole("--images-per-id", self.images_per_id, 1, 10_000)
        whole("--captions-per-image", self.captions_per_image, 1, 100)
        if not (isinstance(self.image_size, (tuple, list)) and len(self.image_size) == 2):
            raise ValueError(f"--image-size: expected HxW, got {self.image_size!r}")
        for v in self.image_size:
            whole("--image-size", v, 16, 4096)
        if not isinstance(self.twin_fraction, (int, float)) or not 0 <= self.twin_fraction <= 1:
            raise ValueError(f"--twin-fraction: must be a share in [0, 1], got {self.twin_fraction!r}")
        whole("--seed", self.seed, -(2 ** 63), 2 ** 63 - 1)

    def split_sizes(self) -> dict[str, int]:
        val = test = max(1, self.num_ids // 6)
        train = self.num_ids - val - test
        if train < 1:
            raise ValueError(f"--num-ids {self.num_ids} is too small: need at least 3 identities")
        return {"train": train, "val": val, "test": test}


def synthetic_records(spec: SyntheticSpec) -> Iterator[Record]:
    """All records of the synthetic dataset, split by split, identity by identity."""
    for _, record in _generate(spec):
        yield record


def people_of(spec: SyntheticSpec) -> dict[str, set[Person]]:
    """The identities (attribute sets) of each split of the dataset `spec` builds (by generating it:
    the images draw from the same random sequence)."""
    people: dict[str, set[Person]] = {}
    for person, record in _generate(spec):
        people.setdefault(record.split, set()).add(person)
    return people


def _generate(spec: SyntheticSpec) -> Iterator[tuple[Person, Record]]:
    rng = random.Random(spec.seed)
    image_id = 0
    pid = 0
    for split, n in spec.split_sizes().items():
        for person in make_people(n, spec.twin_fraction, rng):
            for i in range(spec.images_per_id):
                img = draw_person(person, rng, spec.image_size)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                yield person, Record(
                    split=split, pid=pid, image_id=image_id,
                    captions=[caption(person, rng) for _ in range(spec.captions_per_image)],
                    source=f"synthetic/{split}/{pid:05d}_{i}.jpg",
                    image_bytes=buf.getvalue(), image_ext="jpg",
                )
                image_id += 1
            pid += 1
