"""CLIP's byte-pair encoding, id for id open_clip's `SimpleTokenizer` (OpenAI's, with open_clip's
names of the two special tokens), read from open_clip's vocabulary file without importing
open_clip (which loads torchvision and timm: seconds in every process that tokenises)."""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

import ftfy
import regex

SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
MERGES = 49152 - 256 - 2  # (lines of the vocabulary file that are merges: the vocabulary is 49408 ids)


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes stand for themselves, the others
    for characters from 256 up, so that no byte becomes whitespace or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + [256 + i for i in range(len(others))])))


def vocabulary_file() -> Path:
    """open_clip's bpe_simple_vocab_16e6.txt.gz (found without importing the package)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("open_clip's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) is not installed: "
                            "pip install open_clip_torch")


def clean(text: str) -> str:
    """Mojibake fixed, HTML entities (even twice escaped) decoded, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class BytePairEncoder:
    """Text -> CLIP token ids (no start/end tokens); `sot_token_id`, `eot_token_id`, `vocab_size`."""

    def __init__(self, path: Path | None = None):
        with gzip.open(path or vocabulary_file()) as f:
            merges = f.read().decode("utf-8").split("\n")[1:MERGES + 1]
        merges = [tuple(m.split()) for m in merges]
        symbols = list(byte_to_unicode().values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), *SPECIAL_TOKENS]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache = {t: t for t in SPECIAL_TOKENS}
        self.pattern = regex.compile("|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self.vocab_size = len(vocab)
        self.sot_token_id, self.eot_token_id = (self.encoder[t] for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        to_unicode = byte_to_unicode()
        ids = []
        for word in self.pattern.findall(clean(text)):
            pieces = self.merge("".join(to_unicode[b] for b in word.encode("utf-8")))
            ids.extend(self.encoder[p] for p in pieces.split(" "))
        return ids

    def merge(self, word: str) -> str:
        """The word's pieces, space-separated, the last one marked `</w>`: the lowest-ranked adjacent
        pair merged, again and again, until no pair of the vocabulary is left."""
        if word in self.cache:
            return self.cache[word]
        parts = (*word[:-1], word[-1] + "</w>")
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        self.cache[word] = " ".join(parts)
        return self.cache[word]
