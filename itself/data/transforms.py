"""Image decode + the paper's image augmentations, and CLIP tokenisation + text augmentation.

All randomness comes from generators passed in, so a (seed, epoch, rank, worker) fixes every
augmentation: runs are reproducible and a resumed run sees the same data it would have seen.
"""

from __future__ import annotations

import functools
import math
import random

import torch

from shards.imaging import decode_array

from .bpe import BytePairEncoder

# CLIP's normalisation constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PAD = 10  # pixels of padding before the random crop (paper / reference code)
ERASE_P, ERASE_SCALE, ERASE_RATIO = 0.5, (0.02, 0.4), (0.3, 3.3)  # torchvision RandomErasing defaults

# Text augmentation, as the reference code: a real token is picked with TEXT_AUG_P, then masked
# (60%), replaced by a random vocabulary token (20%) or removed (20%).
TEXT_AUG_P = 0.2
MASK_SHARE, REPLACE_SHARE = 0.6, 0.2
# The reference code repurposes the last BPE merge of CLIP's vocabulary (id 49405) as <|mask|>.
MASK_TOKEN = 49405
PAD_TOKEN = 0


def decode(data: bytes, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor [3, H, W] (RGB, upright). Raises on corrupt data.

    The project's one decoder (`shards.imaging.decode_array`), so what the dataset builder
    accepted is what this reads: JPEGs through libjpeg-turbo (simplejpeg, 2-3x faster than Pillow,
    bench/loader_bench.py; Pillow for a stream it refuses), EXIF orientation applied, images over
    Pillow's pixel limit refused from their header. With `size` (H, W), a JPEG at least twice that
    size is decoded at a reduced DCT scale that still covers it.
    """
    return torch.from_numpy(decode_array(data, size)).permute(2, 0, 1)


_MEAN255 = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
_STD255 = torch.tensor(CLIP_STD).view(3, 1, 1) * 255


def _normalise(img: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> CLIP-normalised float, in one pass."""
    return (img.float() - _MEAN255) / _STD255


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, H, W], bilinear with antialiasing (uint8 kernels: no float copy)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    from torchvision.transforms.v2.functional import resize as tv_resize

    return tv_resize(img, list(size), antialias=True)


def eval_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Decoded image -> normalised float tensor of the configured size (no augmentation)."""
    return _normalise(resize(img, size))


def train_image(img: torch.Tensor, size: tuple[int, int], gen: torch.Generator, augment: bool = True) -> torch.Tensor:
    """Decoded image -> augmented, normalised tensor: resize, flip, pad+crop, normalise, erase.
    Geometry runs on uint8; the one float conversion comes last."""
    x = resize(img, size)
    if not augment:
        return _normalise(x)
    h, w = size
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    # Pad by PAD (black, as torchvision's Pad before ToTensor) and crop back to h x w: the crop
    # window's offset within the padded image decides which part of x lands where.
    top = int(torch.randint(0, 2 * PAD + 1, (), generator=gen)) - PAD
    left = int(torch.randint(0, 2 * PAD + 1, (), generator=gen)) - PAD
    canvas = torch.zeros_like(x)
    canvas[:, max(0, -top):h - max(0, top), max(0, -left):w - max(0, left)] = \
        x[:, max(0, top):h - max(0, -top), max(0, left):w - max(0, -left)]
    x = _normalise(canvas)
    if torch.rand((), generator=gen) < ERASE_P:
        _erase(x, gen)
    return x


ERASE_VALUE = torch.tensor(CLIP_MEAN).view(3, 1, 1)
"""What an erased box is filled with, as the reference code: torchvision's RandomErasing(value=mean)
after normalisation, so the raw CLIP mean (0.48, 0.46, 0.41) lands in the normalised tensor."""


def _erase(x: torch.Tensor, gen: torch.Generator) -> None:
    """Random erasing in place (torchvision's sampling of the box); the box takes ERASE_VALUE."""
    _, h, w = x.shape
    area = h * w
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(10):  # torchvision's rejection sampling of a box that fits
        u = torch.rand(2, generator=gen).tolist()
        target = area * (ERASE_SCALE[0] + u[0] * (ERASE_SCALE[1] - ERASE_SCALE[0]))
        ratio = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if eh < h and ew < w:
            i = int(torch.randint(0, h - eh + 1, (), generator=gen))
            j = int(torch.randint(0, w - ew + 1, (), generator=gen))
            x[:, i:i + eh, j:j + ew] = ERASE_VALUE
            return


@functools.lru_cache(maxsize=1)
def _bpe() -> BytePairEncoder:
    """CLIP's BPE tokenizer, loaded once per process (loading the vocabulary takes ~0.1 s)."""
    return BytePairEncoder()


class Tokenizer:
    """CLIP BPE tokenisation to a fixed length: [SOS] tokens [EOT] then zero padding."""

    def __init__(self, text_length: int = 77):
        self._bpe = _bpe()
        self.text_length = text_length
        self.sot, self.eot = self._bpe.sot_token_id, self._bpe.eot_token_id
        self.vocab_size = self._bpe.vocab_size

    def encode(self, caption: str) -> list[int]:
        """The caption's word-piece ids, without start/end tokens."""
        return self._bpe.encode(caption)

    def pack(self, ids: list[int]) -> torch.Tensor:
        """ids -> LongTensor[text_length], truncated so the end token always fits."""
        ids = [self.sot, *ids[: self.text_length - 2], self.eot]
        out = torch.full((self.text_length,), PAD_TOKEN, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __call__(self, caption: str, rng: random.Random | None = None) -> torch.Tensor:
        """Tokenise `caption`; with `rng`, apply the paper's text augmentation first."""
        ids = self.encode(caption)[: self.text_length - 2]  # augment what the model will see
        if rng is not None:
            ids = augment_tokens(ids, rng)
        return self.pack(ids)


def augment_tokens(ids: list[int], rng: random.Random) -> list[int]:
    """Random masking, replacement and removal of word-piece tokens (reference-code rates)."""
    out = []
    for t in ids:
        p = rng.random()
        if p >= TEXT_AUG_P:
            out.append(t)
            continue
        p /= TEXT_AUG_P
        if p < MASK_SHARE:
            out.append(MASK_TOKEN)
        elif p < MASK_SHARE + REPLACE_SHARE:
            out.append(rng.randrange(1, MASK_TOKEN))
        # else: removed
    return out
