"""
Write a video dataset to data/<name>/ as uint8 clip memmaps, captions and a text vocabulary.

    python prepare_data.py                                    # the built-in `shapes` benchmark
    python prepare_data.py --dataset folder --src film.mp4    # your own videos
    python prepare_data.py --dataset mnist --src mnist_idx/   # Moving MNIST with digit captions

Three sources:
- shapes: one procedural coloured shape moving across a black canvas, captioned
  "a big red circle moving left" (and paraphrases). Its attributes can be read
  back from any video by `read_clip`, which turns generated videos into a
  caption accuracy (see `caption_accuracy`).
- folder: a directory of videos (or one file), resampled to --fps, resized on the
  short side and centre-cropped to --size, cut into --frames clips every --stride
  frames. Captions from captions.jsonl or a .txt beside each video.
- mnist: two MNIST digits bouncing in a square canvas, captioned "2 and four"
  (as in the Make-A-Video Moving MNIST experiments).

The format (one directory, written to a temporary directory and renamed into
place when complete, so a kill never leaves half a dataset):
    meta.json              version, frames, size, fps, counts, text_len, text vocabulary, flags
    vocab.tiktoken         the byte-level BPE, in tiktoken's file format (absent for named encodings)
    {split}_clips.u8       uint8 memmap (N, T, H, W, 3), split in {train, val}
    {split}_ids.npy        int32 (N, text_len) caption token ids, padded with meta['text']['pad_id']
    {split}_captions.txt   one caption per line
`load_split` / `get_batch` read random batches from it in O(1) per clip.
"""
import argparse
import base64
import collections
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.request

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from tqdm import tqdm

FORMAT_VERSION = 1
VIDEO_EXTS = ('.mp4', '.webm', '.mov', '.avi', '.gif', '.mkv', '.m4v')


class DataError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


# -----------------------------------------------------------------------------
# shapes: the attributes, the captions and the renderer

COLORS = {
    'red': (230, 30, 30), 'green': (30, 200, 50), 'blue': (40, 80, 240),
    'yellow': (240, 220, 30), 'magenta': (220, 40, 220), 'cyan': (30, 210, 220),
}
SHAPES = ('circle', 'square', 'triangle', 'cross')
SIZES = {'small': 0.25, 'big': 0.40}  # the shape's width as a share of the canvas side
MOTIONS = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}  # (dx, dy), y points down
ATTRIBUTES = ('color', 'shape', 'size', 'motion')
VALUES = {'color': tuple(COLORS), 'shape': SHAPES, 'size': tuple(SIZES), 'motion': tuple(MOTIONS)}
COMBOS = [(c, s, z, m) for c in COLORS for s in SHAPES for z in SIZES for m in MOTIONS]  # 192
SYNONYMS = {'big': ('big', 'large'), 'small': ('small', 'little', 'tiny'),
            'circle': ('circle', 'ball'), 'square': ('square', 'box'), 'cross': ('cross', 'plus')}
CANONICAL = 'a {size} {color} {shape} moving {motion}'
# The other half of the training captions comes from a small grammar: a noun phrase (adjectives before or after
# the noun), a verb, a frame around them, and now and then a made-up word, so the model learns to read the
# attribute words wherever they stand and past words it never saw (held-out phrasings 0.17 -> 0.83: RESULTS.md).
NOUNS = ('{size} {color} {shape}', '{color} {size} {shape}', '{color} {shape}, {size},', '{size} {shape}, {color},',
         '{color} {shape} that is {size}', '{size} {shape} that is {color}', '{size} and {color} {shape}')
DETERMINERS = ('a', 'the', 'one', '')
PARTICIPLES = ('moving', 'going', 'heading', 'travelling', 'sliding', 'drifting', 'gliding')
VERBS = ('moves', 'goes', 'heads', 'travels', 'slides', 'drifts', 'glides')
SENTENCES = ('{det} {noun} {ing} {motion}', '{det} {noun} {verb} {motion}', '{det} {noun} is {ing} {motion}',
             'there is {det} {noun} {ing} {motion}', '{det} {noun} that {verb} {motion}',
             '{ing} {motion}: {det} {noun}', 'a video of {det} {noun} {ing} {motion}', '{motion}, {det} {noun}',
             '{det} {noun}, {motion}')
# eval.py --phrasing held_out prompts with these; --holdout_phrasings keeps them and their words out of training.
# Chosen once, before any tuning, and not to be changed (a figure on them is only fair while nothing saw them).
HELD_OUT_PHRASINGS = (
    'this shows a {size} {color} {shape} which travels {motion}',
    'here we see the {color} {shape}, {size}, as it goes {motion}',
    '{motion} goes a {color} {shape} ({size})',
    'watch one {size} {shape} in {color} heading {motion}',
    'the {shape} is {size} and {color} and it is sliding {motion}',
    'a {color}, {size} {shape} drifting {motion} across the canvas',
)
HELD_OUT_WORDS = ('this', 'shows', 'which', 'here', 'we', 'see', 'as', 'it', 'watch', 'in', 'across', 'canvas')
CAPTIONS_VERSION = 2  # 1: the canonical caption and six paraphrases; 2: the grammar above
WORD_TO_ATTR = {w: (attr, v) for attr in ATTRIBUTES for v in VALUES[attr] for w in SYNONYMS.get(v, (v,))}


def made_up_word(rng: np.random.Generator) -> str:
    """A random lower-case non-word (consonant-vowel syllables), never an attribute or a held-out word."""
    while True:
        syllables = rng.integers(1, 4)
        w = ''.join(rng.choice(list('bcdfgklmnprstvz')) + rng.choice(list('aeiou')) for _ in range(syllables))
        if w not in WORD_TO_ATTR and w not in HELD_OUT_WORDS:
            return w


def caption(attrs: dict, rng: np.random.Generator | None = None, made_up: float = 0.2,
            held_out_share: float = 0.0) -> str:
    """The canonical caption, or (given an rng) the canonical one half the time and otherwise a phrasing of the
    grammar with random synonyms; `made_up` of those get a made-up word somewhere, `held_out_share` of them are
    held-out phrasings instead (prepare_data.py --no-holdout_phrasings)."""
    if rng is None or rng.random() < 0.5:
        return CANONICAL.format(**attrs)
    if rng.random() < held_out_share:
        return held_out_caption(attrs, rng)
    words = synonyms(attrs, rng)
    noun = NOUNS[rng.integers(len(NOUNS))].format(**words)
    text = SENTENCES[rng.integers(len(SENTENCES))].format(
        det=DETERMINERS[rng.integers(len(DETERMINERS))], noun=noun, ing=PARTICIPLES[rng.integers(len(PARTICIPLES))],
        verb=VERBS[rng.integers(len(VERBS))], motion=words['motion'])
    text = ' '.join(text.replace(',:', ':').replace(',,', ',').split()).strip(',').strip()
    if rng.random() < made_up:
        parts = text.split(' ')
        parts.insert(int(rng.integers(len(parts) + 1)), made_up_word(rng))
        text = ' '.join(parts)
    return text


def shapes_words(held_out: bool) -> set[str]:
    """The words shapes captions are made of (the made-up ones aside); with the held-out phrasings' unless held_out."""
    texts = [CANONICAL, *NOUNS, *DETERMINERS, *PARTICIPLES, *VERBS, *SENTENCES, *WORD_TO_ATTR]
    texts += [] if held_out else list(HELD_OUT_PHRASINGS)
    return {w for t in texts for w in normalize_text(t.replace('{', ' {').replace('}', '} ')).split()
            if not w.startswith(('{', '}'))} - {'size', 'color', 'shape', 'motion', 'det', 'noun', 'ing', 'verb'}


def held_out_caption(attrs: dict, rng: np.random.Generator) -> str:
    """A prompt in one of HELD_OUT_PHRASINGS, with random synonyms."""
    words = synonyms(attrs, rng)
    return HELD_OUT_PHRASINGS[rng.integers(len(HELD_OUT_PHRASINGS))].format(**words)


def held_out_phrasing(prompt: str) -> int:
    """Which of HELD_OUT_PHRASINGS a prompt of held_out_caption() is written in (its index), or -1."""
    for i, template in enumerate(HELD_OUT_PHRASINGS):
        if re.fullmatch(re.sub(r'\\\{\w+\\\}', '(.+)', re.escape(template)), prompt):
            return i
    return -1


def synonyms(attrs: dict, rng: np.random.Generator) -> dict:
    """Each attribute's value as one of its words (SYNONYMS), drawn at random."""
    return {k: str(rng.choice(SYNONYMS.get(v, (v,)))) for k, v in attrs.items()}


def normalize_text(text: str) -> str:
    """What the text encoder reads: lower case, words only (punctuation to spaces), single spaces."""
    return ' '.join(re.sub(r"[^\w']+", ' ', text.lower()).split())


def parse_holdout(text: str) -> list[dict]:
    """'green triangle,small cyan' -> [{'color': 'green', 'shape': 'triangle'}, {'size': 'small', 'color': 'cyan'}]."""
    entries = []
    for entry in filter(None, (e.strip() for e in (text or '').split(','))):
        held = {}
        for word in entry.lower().split():
            if word not in WORD_TO_ATTR:
                raise DataError(f"--holdout: unknown word '{word}' in '{entry}'; use words of "
                                f"{', '.join(sorted(WORD_TO_ATTR))}")
            attr, value = WORD_TO_ATTR[word]
            if held.get(attr, value) != value:
                raise DataError(f"--holdout: '{entry}' names two {attr}s; no clip matches it")
            held[attr] = value
        entries.append(held)
    return entries


def is_held_out(attrs: dict, holdout: list[dict]) -> bool:
    return any(all(attrs[k] == v for k, v in h.items()) for h in holdout)


def shape_coverage(shape: str, dx: torch.Tensor, dy: torch.Tensor, w) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of a shape of width w (pixels) at offsets (dx, dy) from its box centre."""
    if shape == 'circle':
        sd = torch.sqrt(dx * dx + dy * dy) - w / 2
    elif shape == 'square':
        sd = torch.maximum(dx.abs(), dy.abs()) - w / 2
    elif shape == 'cross':  # a plus sign whose arms are w/3 thick
        ax, ay = dx.abs(), dy.abs()
        sd = torch.minimum(torch.maximum(ax - w / 2, ay - w / 6), torch.maximum(ax - w / 6, ay - w / 2))
    elif shape == 'triangle':  # equilateral, apex up, box height w*sqrt(3)/2; centroid sits h/6 below the box centre
        h = w * math.sqrt(3) / 2
        qy = dy - h / 6
        r = w / (2 * math.sqrt(3))  # inradius
        s3 = math.sqrt(3) / 2
        sd = torch.maximum(torch.maximum(qy - r, -s3 * dx - 0.5 * qy - r), s3 * dx - 0.5 * qy - r)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return (0.5 - sd).clamp(0, 1)  # a one-pixel linear ramp across the edge


def sample_shapes(n: int, size: int, frames: int, rng: np.random.Generator, holdout=(),
                  edges: float = 0.0, wrap: float = 0.0) -> list[dict]:
    """Draw n clips' attributes and trajectories (centres in pixels, per frame) under the rules of SHAPES.md.
    A share `edges` of them starts closer to the edge it moves to (0.2 of the canvas up to its travel), reaches
    it during the clip and stays there: what a story's later prompt meets where the object already travelled.
    A share `wrap` starts anywhere (whole) and wraps round the canvas (leaving one edge, it comes back in at
    the opposite one), so that a motion can go on from any place, as a story's later prompt or a long video
    asks."""
    combos = [c for c in COMBOS if not is_held_out(dict(zip(ATTRIBUTES, c)), holdout)]
    if not combos:
        raise DataError('--holdout removes every combination; nothing is left to train on')
    out = []
    for i in rng.integers(len(combos), size=n):
        attrs = dict(zip(ATTRIBUTES, combos[i]))
        w = SIZES[attrs['size']] * size
        mx, my = MOTIONS[attrs['motion']]
        dist = rng.uniform(0.35, 0.50) * size
        lo, hi = w / 2, size - w / 2  # the centre's range that keeps the whole shape inside the canvas
        along = rng.uniform(lo + dist, hi) if mx + my < 0 else rng.uniform(lo, hi - dist)
        across = rng.uniform(lo, hi)
        room, wraps = dist, False
        if edges and rng.random() < edges:  # the edge is `room` away, less than the travel: it stops there
            room = rng.uniform(0.2 * size, dist)
            along = lo + room if mx + my < 0 else hi - room
        elif wrap and rng.random() < wrap:  # it starts whole, anywhere, and may cross the edge it moves to
            along, wraps = rng.uniform(lo, hi), True  # (render_shapes draws it modulo the canvas)
        t = np.linspace(0, 1, frames)
        moving = along + (mx + my) * np.minimum(dist * t, room)
        cx, cy = (moving, np.full(frames, across)) if mx else (np.full(frames, across), moving)
        out.append(dict(attrs=attrs, width=w, cx=cx, cy=cy, wrap=wraps))
    return out


def render_shapes(clips: list[dict], size: int) -> np.ndarray:
    """Render clips from `sample_shapes` to uint8 (N, T, size, size, 3), all clips of a shape at once."""
    n, frames = len(clips), len(clips[0]['cx'])
    cx = torch.tensor(np.stack([c['cx'] for c in clips]), dtype=torch.float32)[:, :, None, None]  # (N, T, 1, 1)
    cy = torch.tensor(np.stack([c['cy'] for c in clips]), dtype=torch.float32)[:, :, None, None]
    w = torch.tensor([c['width'] for c in clips], dtype=torch.float32)[:, None, None, None]
    grid = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    cover = torch.empty(n, frames, size, size)
    wraps = torch.tensor([c.get('wrap', False) for c in clips])[:, None, None, None]
    torus = lambda d, i: torch.where(wraps[i], (d + size / 2) % size - size / 2, d)  # offsets on the wrapped canvas
    for shape in SHAPES:
        idx = torch.tensor([i for i, c in enumerate(clips) if c['attrs']['shape'] == shape], dtype=torch.long)
        if len(idx):
            dx = torus(grid[None, None, None, :] - cx[idx], idx)  # (n, T, 1, W)
            dy = torus(grid[None, None, :, None] - cy[idx], idx)  # (n, T, H, 1)
            cover[idx] = shape_coverage(shape, dx, dy, w[idx])
    rgb = torch.tensor([COLORS[c['attrs']['color']] for c in clips], dtype=torch.float32)  # (N, 3)
    video = cover[..., None] * rgb[:, None, None, None, :] + 0.5  # (N, T, H, W, 3)
    return video.to(torch.uint8).numpy()


# -----------------------------------------------------------------------------
# shapes: reading the attributes back from a video, without a learned model

def _components(fg: np.ndarray) -> np.ndarray:
    """8-connected component labels of a (T, H, W) boolean mask, 0 for background (max-label propagation)."""
    t, h, w = fg.shape
    lab = np.where(fg, np.arange(1, fg.size + 1).reshape(fg.shape), 0)
    while True:
        p = np.pad(lab, ((0, 0), (1, 1), (1, 1)))
        m = lab.copy()
        for oy in range(3):
            for ox in range(3):
                np.maximum(m, p[:, oy:oy + h, ox:ox + w], out=m)
        m = np.where(fg, m, 0)
        if np.array_equal(m, lab):
            return lab
        lab = m


def _unsplit(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Roll each frame where the object touches two opposite edges (it wraps round the canvas, --wrap) so that
    it is whole: the widest empty band of rows or columns moves to the border. Returns the frames and the
    (rows, columns) each was rolled by, (T, 2); other frames stay as they are."""
    fg = video.max(-1) > 0.35 * 255  # (T, H, W)
    shifts = np.zeros((len(video), 2), dtype=int)
    for t in range(len(video)):
        for axis in (0, 1):
            occupied = fg[t].any(1 - axis)  # rows (axis 0) or columns (axis 1) the object covers
            if occupied[0] and occupied[-1] and not occupied.all():
                free = np.flatnonzero(~occupied)
                runs = np.split(free, np.flatnonzero(np.diff(free) > 1) + 1)  # empty bands, none crossing the border
                band = max(runs, key=len)
                shifts[t, axis] = -band[len(band) // 2]  # the band's middle to index 0
    if shifts.any():
        video = np.stack([np.roll(f, s, (0, 1)) for f, s in zip(video, shifts)])
    return video, shifts


def read_clip(video: np.ndarray) -> dict:
    """Read colour, shape, size and motion back from a shapes video, uint8 (T, H, W, 3) with H = W >= 16.

    Returns {'valid': True, 'color': ..., 'shape': ..., 'size': ..., 'motion': ...}, or
    {'valid': False, 'reason': ...} when the video is not a clean shapes clip: no object, several
    objects, an object that vanishes or changes colour, an unrecognisable shape, or no clear motion.
    """
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[1] != video.shape[2] or video.shape[1] < 16:
        raise ValueError(f'read_clip expects uint8 (T, H, W, 3) with H = W >= 16, got shape {video.shape}')
    if video.shape[0] < 2:
        raise ValueError(f'read_clip needs at least 2 frames to see motion, got {video.shape[0]}')
    T, S = video.shape[0], video.shape[1]
    video, shifts = _unsplit(video)
    v = video.astype(np.float32) / 255
    bright = v.max(-1)  # (T, H, W)
    lab = _components(bright > 0.35)
    main = np.zeros_like(bright, dtype=bool)
    for t in range(T):
        ids, counts = np.unique(lab[t][lab[t] > 0], return_counts=True)
        if len(ids) == 0 or counts.max() < 0.005 * S * S:
            return dict(valid=False, reason=f'no object in frame {t}')
        order = np.argsort(counts)[::-1]
        if len(ids) > 1 and counts[order[1]] >= max(4, 0.15 * counts[order[0]]):
            return dict(valid=False, reason=f'several objects in frame {t}')
        main[t] = lab[t] == ids[order[0]]
    areas = main.sum((1, 2))
    if areas.min() < 0.4 * np.median(areas):
        return dict(valid=False, reason=f'the object shrinks or vanishes in frame {int(areas.argmin())}')

    # colour: mean of the object's bright core, per frame, against the palette
    names, palette = list(COLORS), np.array(list(COLORS.values()), dtype=np.float32) / 255
    core = main & (bright > 0.6)
    frame_rgb = np.stack([v[t][core[t]].mean(0) if core[t].any() else v[t][main[t]].mean(0) for t in range(T)])
    dist = np.linalg.norm(frame_rgb[:, None, :] - palette[None], axis=-1)  # (T, 6)
    frame_color = dist.argmin(1)
    if (frame_color != frame_color[0]).any():
        return dict(valid=False, reason=f'the colour changes (frame {int((frame_color != frame_color[0]).argmax())})')
    if dist[np.arange(T), frame_color].max() > 0.3:
        return dict(valid=False, reason='the object is not one of the six colours')
    color = names[frame_color[0]]

    # soft coverage of the object (its component grown by one pixel to keep the anti-aliased rim)
    grown = main.copy()
    p = np.pad(main, ((0, 0), (1, 1), (1, 1)))
    for oy in range(3):
        for ox in range(3):
            grown |= p[:, oy:oy + S, ox:ox + S]
    cover = np.clip(bright / palette[frame_color[0]].max(), 0, 1) * grown  # (T, H, W)
    col, row = cover.max(1), cover.max(2)  # (T, W), (T, H) profiles: every shape is symmetric left-right
    width = col.sum(1)
    pos = np.arange(S) + 0.5
    cx, cy = (col * pos).sum(1) / width, (row * pos).sum(1) / row.sum(1)
    rel_width = float(np.median(width)) / S
    size = 'small' if rel_width < sum(SIZES.values()) / 2 else 'big'

    # shape: best soft IoU against each shape drawn at the measured centre and width
    grid = torch.tensor(pos, dtype=torch.float32)
    dx = grid[None, None, :] - torch.tensor(cx, dtype=torch.float32)[:, None, None]  # (T, 1, W)
    dy = grid[None, :, None] - torch.tensor(cy, dtype=torch.float32)[:, None, None]  # (T, H, 1)
    wt = torch.tensor(width, dtype=torch.float32)[:, None, None]
    c = torch.tensor(cover)
    iou = {s: float((torch.minimum(c, m).sum() / torch.maximum(c, m).sum()))
           for s in SHAPES for m in [shape_coverage(s, dx, dy, wt)]}
    shape = max(iou, key=iou.get)
    if iou[shape] < 0.5:
        return dict(valid=False, reason=f'unrecognisable shape (best match {shape}, IoU {iou[shape]:.2f})')

    # motion: the centre's travel from the first to the last frame, frame by frame on the wrapped canvas
    step = lambda c: (np.diff(c) + S / 2) % S - S / 2  # the shortest way round: a step is less than half the canvas
    mx, my = step(cx - shifts[:, 1]).sum(), step(cy - shifts[:, 0]).sum()
    along, across = (mx, my) if abs(mx) >= abs(my) else (my, mx)
    if abs(along) < 0.15 * S or abs(across) > 0.5 * abs(along):
        return dict(valid=False, reason=f'no clear motion (moved {mx:+.1f}, {my:+.1f} px)')
    motion = ('right' if mx > 0 else 'left') if abs(mx) >= abs(my) else ('down' if my > 0 else 'up')
    return dict(valid=True, color=color, shape=shape, size=size, motion=motion)


def parse_caption(text: str) -> dict:
    """The attributes a shapes caption names (synonyms understood), e.g. for judging a prompt."""
    attrs = {}
    for word in normalize_text(text).split():
        if word in WORD_TO_ATTR:
            attr, value = WORD_TO_ATTR[word]
            attrs[attr] = value
    return attrs


def caption_accuracy(videos, prompts, mistakes: collections.Counter | None = None) -> dict:
    """Share of videos whose colour, shape, size, motion (and all four) match their prompt, and the invalid share.
    mistakes, if given, counts what went wrong: 'square as circle' (asked, read), 'no object (invalid)'."""
    hits = collections.Counter()
    n = 0
    for video, prompt in zip(videos, prompts):
        want, got = parse_caption(prompt), read_clip(video)
        n += 1
        if not got['valid']:
            hits['invalid'] += 1
            if mistakes is not None:  # the reader's reason without its frame or figures
                mistakes[re.sub(r' (in frame \d+|\(.*\))$', '', got['reason']) + ' (invalid)'] += 1
            continue
        ok = [got[a] == want.get(a) for a in ATTRIBUTES]
        for a, o in zip(ATTRIBUTES, ok):
            hits[a] += o
            if mistakes is not None and not o:
                mistakes[f'{want.get(a)} as {got[a]}'] += 1
        hits['all'] += all(ok)
    return {k: hits[k] / max(n, 1) for k in (*ATTRIBUTES, 'all', 'invalid')} | {'n': n}


# -----------------------------------------------------------------------------
# text: a small byte-level BPE trained on the captions, in tiktoken's format

PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PAD = '<|pad|>'


def train_bpe(texts: list[str], vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE merges learnt from texts; returns tiktoken's mergeable ranks (256 bytes first)."""
    import regex  # tiktoken's own dependency, for the \p{L} classes of PAT_STR
    words = collections.Counter(w.encode() for t in texts for w in regex.findall(PAT_STR, t))
    ranks = {bytes([i]): i for i in range(256)}
    pieces = {w: [bytes([b]) for b in w] for w in words}
    while len(ranks) < vocab_size:
        pairs = collections.Counter()
        for w, parts in pieces.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break  # every word is one token already
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        ranks[a + b] = len(ranks)
        for w, parts in pieces.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            pieces[w] = out
    return ranks


def ranks_to_text(ranks: dict[bytes, int]) -> str:
    """tiktoken's file format: one 'base64(token) rank' line per token."""
    return ''.join(f'{base64.b64encode(tok).decode()} {r}\n' for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def get_encoding(text_meta: dict) -> tiktoken.Encoding:
    """Rebuild the tiktoken Encoding from meta['text'] (which checkpoints carry too)."""
    if text_meta['ranks'] is None:
        return tiktoken.get_encoding(text_meta['name'])
    ranks = {base64.b64decode(tok): int(r) for tok, r in (ln.split() for ln in text_meta['ranks'].splitlines() if ln)}
    return tiktoken.Encoding(name=text_meta['name'], pat_str=text_meta['pat_str'], mergeable_ranks=ranks,
                             special_tokens=text_meta['special_tokens'])


def named_encoding(name: str) -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(name)
    except ValueError:
        raise DataError(f"--text_encoding '{name}' is not a tiktoken encoding; "
                        f"use bpe or one of {', '.join(tiktoken.list_encoding_names())}") from None
    except Exception as e:
        raise DataError(f"--text_encoding '{name}' could not be loaded ({type(e).__name__}); "
                        'tiktoken downloads named encodings, so this needs a network or a '
                        'TIKTOKEN_CACHE_DIR that holds it; --text_encoding bpe works offline') from None


def make_text_meta(captions: list[str], encoding: str, vocab_size: int, text_len: int) -> dict:
    """The text vocabulary: a BPE learnt from the normalised captions, or a named tiktoken encoding."""
    captions = [' ' + normalize_text(c) for c in captions]
    if encoding == 'bpe':
        ranks = train_bpe(captions, vocab_size - 1)  # one id is kept for the pad token
        meta = dict(name='nanovideo_bpe', pat_str=PAT_STR, ranks=ranks_to_text(ranks), special_tokens={PAD: len(ranks)})
        meta['pad_id'] = len(ranks)
    else:
        enc = named_encoding(encoding)
        meta = dict(name=encoding, pat_str=enc._pat_str, ranks=None, special_tokens={}, pad_id=enc.eot_token)
    meta['vocab_size'] = get_encoding(meta).n_vocab
    meta['text_len'] = text_len
    # texts pass through normalize_text before encoding (absent in old datasets), and at 2 (True before) with a
    # space before the first word, so a word is one token wherever it stands (prompts that opened with their
    # motion read 'left', a token the captions rarely had, for ' left': RESULTS.md)
    meta['normalize'] = 2
    return meta


def text_tokens(texts: list[str], text_meta: dict) -> list[list[int]]:
    """The token ids of each text, normalised first (normalize_text) when the vocabulary was made that way."""
    if text_meta.get('normalize'):
        lead = ' ' if text_meta['normalize'] == 2 else ''
        texts = [lead + normalize_text(t) for t in texts]
    return get_encoding(text_meta).encode_ordinary_batch(texts)


def caption_words(captions: list[str]) -> list[str]:
    """The words of the captions, as the text encoder reads them (sample.py names a prompt's other words)."""
    return sorted({w for c in captions for w in normalize_text(c).split()})


def encode_captions(captions: list[str], text_meta: dict) -> tuple[np.ndarray, int]:
    """Token ids (N, text_len) padded with pad_id, and how many captions were cut to fit."""
    L = text_meta['text_len']
    ids = np.full((len(captions), L), text_meta['pad_id'], dtype=np.int32)
    cut = 0
    for i, toks in enumerate(text_tokens(captions, text_meta)):
        cut += len(toks) > L
        ids[i, :min(len(toks), L)] = toks[:L]
    return ids, cut


# -----------------------------------------------------------------------------
# sources: each returns {'train': (clips uint8 (N,T,H,W,3) or a writer callback, captions), 'val': ...}

def make_shapes(args, tmp: str) -> dict:
    holdout = parse_holdout(args.holdout)
    out = {}
    for split, n, seed in (('train', args.n_train, args.seed), ('val', args.n_val, args.seed + 1)):
        rng = np.random.default_rng(seed)  # independent draws per split
        clips = sample_shapes(n, args.size, args.frames, rng, holdout if split == 'train' else (), args.edges,
                              args.wrap)
        mm = np.memmap(os.path.join(tmp, f'{split}_clips.u8'), dtype=np.uint8, mode='w+',
                       shape=(n, args.frames, args.size, args.size, 3))
        chunk = max(1, 2 ** 22 // (args.frames * args.size * args.size))
        with tqdm(total=n, desc=f'render {split}', unit='clip', disable=n <= chunk) as bar:
            for i in range(0, n, chunk):
                mm[i:i + chunk] = render_shapes(clips[i:i + chunk], args.size)
                bar.update(len(clips[i:i + chunk]))
        mm.flush()
        del mm
        share = 0.0 if split == 'val' or args.holdout_phrasings else 0.15  # a seventh of the grammar's phrasings
        out[split] = dict(n=n, captions=[caption(c['attrs'], rng, held_out_share=share) for c in clips])
    out['words'] = sorted(set(caption_words(out['train']['captions'])) & shapes_words(args.holdout_phrasings))
    return out


def write_clips(tmp: str, split: str, clips: np.ndarray) -> None:
    mm = np.memmap(os.path.join(tmp, f'{split}_clips.u8'), dtype=np.uint8, mode='w+', shape=clips.shape)
    if len(clips):
        mm[:] = clips
    mm.flush()


def resize_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize (n, h, w, 3) uint8 frames on the short side to `size` (antialiased) and centre-crop to size x size."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (n, 3, h, w)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode='bilinear', antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (n, size, size, 3)


def read_video(path: str, fps: float, size: int) -> tuple[np.ndarray, float | None]:
    """Stream a video: resample to fps (nearest source frame), resize and crop each frame; returns (frames, source fps)."""
    import imageio.v3 as iio
    meta = iio.immeta(path)
    src_fps = meta.get('fps') or (1000 / meta['duration'] if meta.get('duration') else None)
    step = (src_fps or fps) / fps  # source frames per output frame
    out, batch, k = [], [], 0
    for i, frame in enumerate(iio.imiter(path)):
        frame = np.asarray(frame)
        if frame.ndim == 2:
            frame = np.repeat(frame[..., None], 3, -1)
        while round(k * step) == i:  # this source frame is the nearest to output frame k (repeats when upsampling)
            batch.append(frame[..., :3])
            k += 1
        if len(batch) >= 64:
            out.append(resize_crop(np.stack(batch), size))
            batch = []
    if batch:
        out.append(resize_crop(np.stack(batch), size))
    if not out:
        raise ValueError('no frames')
    return np.concatenate(out), src_fps


def find_captions(src: str, videos: list[str]) -> dict[str, str]:
    """Captions from captions.jsonl ({"file": ..., "caption": ...}) or from a .txt beside each video."""
    root = src if os.path.isdir(src) else os.path.dirname(src) or '.'
    caps, jsonl = {}, os.path.join(root, 'captions.jsonl')
    if os.path.exists(jsonl):
        by_name = {}
        with open(jsonl) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        by_name[rec['file']] = str(rec['caption'])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f'{jsonl} line {n}: expected {{"file": ..., "caption": ...}}') from None
        for v in videos:
            rel = os.path.relpath(v, root)
            if rel in by_name or os.path.basename(v) in by_name:
                caps[v] = by_name.get(rel, by_name.get(os.path.basename(v)))
    for v in videos:
        txt = os.path.splitext(v)[0] + '.txt'
        if v not in caps and os.path.exists(txt):
            with open(txt) as f:
                caps[v] = f.read()
    return {v: ' '.join(c.split()) for v, c in caps.items()}  # one line each


def make_folder(args, tmp: str) -> dict:
    src = args.src
    if os.path.isdir(src):
        videos = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs if f.lower().endswith(VIDEO_EXTS))
        if not videos:
            raise DataError(f'--src {src} holds no videos ({", ".join(VIDEO_EXTS)})')
    elif os.path.isfile(src):
        videos = [src]
    else:
        raise DataError(f'--src {src} does not exist')
    caps = find_captions(src, videos)
    per_video, skipped, short = [], [], []
    for v in tqdm(videos, desc='read videos', disable=len(videos) < 4):
        try:
            frames, _ = read_video(v, args.fps, args.size)
        except Exception as e:  # a corrupt file among good ones is skipped and named, not fatal
            skipped.append(f'{os.path.relpath(v, src) if os.path.isdir(src) else v} ({type(e).__name__})')
            continue
        starts = list(range(0, len(frames) - args.frames + 1, args.stride))
        if not starts:
            short.append(f'{os.path.basename(v)} ({len(frames)} frames at {args.fps} fps)')
            continue
        per_video.append((v, frames, starts))
    if not per_video:
        why = [f'{len(skipped)} unreadable: {", ".join(skipped)}'] if skipped else []
        why += [f'shorter than --frames {args.frames}: {", ".join(short)}'] if short else []
        raise DataError(f'no clips from --src {src}: ' + '; '.join(why))
    total = sum(len(s) for _, _, s in per_video)
    if args.val_frac > 0 and total < 2:
        raise DataError(f'--src {src} gives only {total} clip; need 2 for a train and a val split '
                        '(use a smaller --stride or --frames, or more video)')
    # the last val_frac of each video's clips is validation; train clips that overlap them in time are dropped
    split = {'train': [], 'val': []}
    for v, frames, starts in per_video:
        n_val = int(len(starts) * args.val_frac)
        val_starts = starts[len(starts) - n_val:] if n_val else []
        first_val = val_starts[0] if val_starts else len(frames)
        split['train'] += [(v, frames, s) for s in starts if s + args.frames <= first_val]
        split['val'] += [(v, frames, s) for s in val_starts]
    if args.val_frac > 0 and not split['val']:
        v, frames, starts = per_video[-1]
        split['val'] = [(v, frames, starts[-1])]
        split['train'] = [c for c in split['train'] if not (c[0] == v and c[2] + args.frames > starts[-1])]
    out = {}
    for name, items in split.items():
        write_clips(tmp, name, np.stack([f[s:s + args.frames] for _, f, s in items]) if items
                    else np.zeros((0, args.frames, args.size, args.size, 3), np.uint8))
        out[name] = dict(n=len(items), captions=[caps.get(v, '') for v, _, _ in items])
    out['report'] = dict(videos=len(videos), skipped=skipped, too_short=short,
                         captioned_videos=sum(v in caps for v, _, _ in per_video))
    if not caps:
        print(f'no captions.jsonl or .txt captions in {src}: the dataset is unconditional (empty captions)')
    return out


MNIST_URL = 'https://ossci-datasets.s3.amazonaws.com/mnist/'
MNIST_FILES = {  # name -> md5 of the .gz
    'train-images-idx3-ubyte': 'f68b3c2dcbeaaa9fbdd348bbdeb94873',
    'train-labels-idx1-ubyte': 'd53e105ee54ea40749a09fcbcd1e9432',
    't10k-images-idx3-ubyte': '9fb629c4189551a2d022fa330f9573f3',
    't10k-labels-idx1-ubyte': 'ec29112dd5afa0611ce80d1b7f02629c',
}
DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')


def read_idx(path: str) -> np.ndarray:
    """An idx file (raw or .gz) as a numpy array: MNIST's format, a big-endian header then uint8 data."""
    with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f'{path} is not a uint8 idx file')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise DataError(f'{path} is truncated: header says {shape}, file holds {body.size} values')
    return body.reshape(shape)


def download_mnist(dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for name, md5 in MNIST_FILES.items():
        path = os.path.join(dest, name + '.gz')
        if os.path.exists(path) and hashlib.md5(open(path, 'rb').read()).hexdigest() == md5:
            continue
        print(f'downloading {MNIST_URL}{name}.gz')
        try:
            data = urllib.request.urlopen(MNIST_URL + name + '.gz', timeout=60).read()
        except OSError as e:
            raise DataError(f'could not download MNIST ({e}); put the four idx files in a folder and pass --src') from None
        if hashlib.md5(data).hexdigest() != md5:
            raise DataError(f'{name}.gz failed its checksum; download it by hand and pass --src')
        with open(path + '.tmp', 'wb') as f:
            f.write(data)
        os.replace(path + '.tmp', path)


def moving_mnist(images: np.ndarray, labels: np.ndarray, n: int, size: int, frames: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Two digits bouncing off the walls of a size x size canvas, and captions like '2 and four'."""
    d = images.shape[1]
    lim = size - d
    idx = rng.integers(len(images), size=(n, 2))
    pos = rng.uniform(0, lim, size=(n, 2, 2))  # (clip, digit, xy)
    angle = rng.uniform(0, 2 * np.pi, size=(n, 2))
    vel = np.stack([np.cos(angle), np.sin(angle)], -1) * rng.uniform(2, 4, size=(n, 2, 1)) * size / 64
    traj = np.empty((n, frames, 2, 2))
    for t in range(frames):
        traj[:, t] = pos
        pos = pos + vel
        for lo_hi in (pos < 0, pos > lim):  # reflect off the walls
            vel = np.where(lo_hi, -vel, vel)
        pos = np.clip(np.where(pos < 0, -pos, np.where(pos > lim, 2 * lim - pos, pos)), 0, lim)
    traj = traj.round().astype(int)
    video = np.zeros((n, frames, size, size), np.uint8)
    for i in range(n):
        for t in range(frames):
            for j in range(2):
                x, y = traj[i, t, j]
                np.maximum(video[i, t, y:y + d, x:x + d], images[idx[i, j]], out=video[i, t, y:y + d, x:x + d])
    words = lambda k: str(k) if rng.random() < 0.5 else DIGIT_WORDS[k]
    caps = [f'{words(int(labels[a]))} and {words(int(labels[b]))}' for a, b in idx]
    return np.repeat(video[..., None], 3, -1), caps


def make_mnist(args, tmp: str) -> dict:
    if args.size < 32:
        raise DataError(f'--size {args.size} is too small for 28x28 MNIST digits; use 32 or more (64 is standard)')
    src = args.src
    if src is None:
        src = os.path.join(os.path.dirname(os.path.abspath(args.out)), 'mnist_raw')
        download_mnist(src)
    found = {}
    for name in MNIST_FILES:
        cands = [os.path.join(src, nm + ext) for nm in (name, name.replace('-idx', '.idx')) for ext in ('', '.gz')]
        hit = [c for c in cands if os.path.exists(c)]
        if not hit:
            raise DataError(f'--src {src} lacks {name} (raw or .gz); it needs the four MNIST idx files')
        found[name] = hit[0]
    out = {}
    for split, prefix, n, seed in (('train', 'train', args.n_train, args.seed), ('val', 't10k', args.n_val, args.seed + 1)):
        images, labels = read_idx(found[f'{prefix}-images-idx3-ubyte']), read_idx(found[f'{prefix}-labels-idx1-ubyte'])
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DataError(f'{prefix} MNIST files disagree: images {images.shape}, labels {labels.shape}')
        if images.shape[1] > args.size:
            raise DataError(f'--size {args.size} is smaller than the {images.shape[1]}px digits')
        rng = np.random.default_rng(seed)
        mm = np.memmap(os.path.join(tmp, f'{split}_clips.u8'), dtype=np.uint8, mode='w+',
                       shape=(n, args.frames, args.size, args.size, 3))
        caps = []
        for i in tqdm(range(0, n, 512), desc=f'mnist {split}', disable=n <= 512):
            clips, c = moving_mnist(images, labels, min(512, n - i), args.size, args.frames, rng)
            mm[i:i + len(clips)] = clips
            caps += c
        mm.flush()
        del mm
        out[split] = dict(n=n, captions=caps)
    return out


# -----------------------------------------------------------------------------
# reading a dataset back

def load_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{data_dir} is not a dataset (no meta.json); write one with python prepare_data.py')
    with open(path) as f:
        meta = json.load(f)
    if meta.get('version') != FORMAT_VERSION:
        raise ValueError(f'{data_dir} has format version {meta.get("version")}, this code reads {FORMAT_VERSION}; '
                         'rerun prepare_data.py with --force')
    return meta


def load_split(data_dir: str, split: str) -> dict:
    """Open one split without reading it: the clip memmap, the token ids and the captions."""
    meta = load_meta(data_dir)
    n, s = meta['counts'][split], meta['size']
    clips = np.memmap(os.path.join(data_dir, f'{split}_clips.u8'), dtype=np.uint8, mode='r',
                      shape=(n, meta['frames'], s, s, 3)) if n else np.zeros((0, meta['frames'], s, s, 3), np.uint8)
    ids = np.load(os.path.join(data_dir, f'{split}_ids.npy'))
    with open(os.path.join(data_dir, f'{split}_captions.txt')) as f:
        captions = f.read().split('\n')[:n]
    return dict(clips=clips, ids=ids, captions=captions, meta=meta, split=split)


def to_model(clips: np.ndarray | torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, h, w) in [-1, 1], area-downsampled to resolution x resolution."""
    x = torch.as_tensor(np.asarray(clips))
    B, T, H, W, _ = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(B * T, 3, H, W).float()  # frames channels-first: pooling's layout
    if resolution and resolution != H:
        f = H // resolution
        if f * resolution != H or H != W:
            raise ValueError(f'resolution {resolution} must divide the data size {H}x{W}')
        x = F.avg_pool2d(x, f)  # (B*T, 3, h, w); 2.5x faster than a mean over a 7-d view
    return (x.view(B, T, *x.shape[1:]).transpose(1, 2) / 127.5 - 1).contiguous()  # (B, 3, T, h, w)


def get_batch(data: dict, batch_size: int, resolution: int | None = None,
              generator: torch.Generator | None = None, idx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch (clips float (B, 3, T, h, w) in [-1, 1], ids long (B, text_len)), reading only those clips."""
    n = len(data['clips'])
    if n == 0:
        raise ValueError(f"the {data['split']} split is empty")
    if idx is None:
        idx = torch.randint(n, (batch_size,), generator=generator)
    idx = np.sort(np.asarray(idx))  # sorted reads are sequential on disk
    return to_model(data['clips'][idx], resolution), torch.from_numpy(data['ids'][idx].astype(np.int64))


# -----------------------------------------------------------------------------
# writing videos for people to look at

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def contact_sheet(videos: np.ndarray, scale: int = 2) -> np.ndarray:
    """uint8 (N, T, H, W, 3) -> one image, a row per video and a column per frame, on a grey grid."""
    N, T, H, W, _ = videos.shape
    sheet = np.full((N * (H + 1) + 1, T * (W + 1) + 1, 3), 64, np.uint8)
    for i in range(N):
        for t in range(T):
            sheet[1 + i * (H + 1):(i + 1) * (H + 1), 1 + t * (W + 1):(t + 1) * (W + 1)] = videos[i, t]
    return np.kron(sheet, np.ones((scale, scale, 1), np.uint8))


def write_video(path: str, frames: np.ndarray, fps: float, scale: int = 1) -> None:
    """uint8 (T, H, W, 3) -> a GIF or MP4 (by extension), written atomically, optionally scaled up."""
    import imageio.v3 as iio
    if scale > 1:
        frames = np.kron(frames, np.ones((1, scale, scale, 1), np.uint8))
    ext = os.path.splitext(path)[1]
    tmp = path + '.tmp' + ext
    if ext == '.gif':
        iio.imwrite(tmp, frames, duration=1000 / fps, loop=0)
    else:
        iio.imwrite(tmp, frames, fps=fps, macro_block_size=1)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the command line

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--dataset', default='shapes', choices=['shapes', 'folder', 'mnist'], help='which source to write')
    p.add_argument('--src', default=None, help='folder: a video file or a directory of videos; mnist: a folder with the four idx files')
    p.add_argument('--out', default=None, help='output directory (default data/<dataset>, or data/<src name> for folder)')
    p.add_argument('--force', action='store_true', help='replace an existing dataset made with other flags')
    p.add_argument('--size', type=int, default=64, help='square canvas side in pixels')
    p.add_argument('--frames', type=int, default=17, help='frames per clip (1 + 4k suits the causal tokenizer)')
    p.add_argument('--fps', type=float, default=8, help='frames per second of the clips (folder: videos are resampled to it)')
    p.add_argument('--stride', type=int, default=8, help='folder: a clip starts every this many (resampled) frames')
    p.add_argument('--val_frac', type=float, default=0.05, help="folder: share of each video's clips (its end) kept for validation")
    p.add_argument('--n_train', type=int, default=10000, help='shapes/mnist: training clips')
    p.add_argument('--n_val', type=int, default=512, help='shapes/mnist: validation clips')
    p.add_argument('--seed', type=int, default=1337, help='shapes/mnist: seed of the train split (val uses seed + 1)')
    p.add_argument('--holdout', default='', help='shapes: comma-separated combinations kept out of train, e.g. "green triangle,small cyan"')
    p.add_argument('--text_encoding', default='bpe', help='bpe (a byte-level BPE trained on the captions, offline) or a tiktoken name such as gpt2')
    p.add_argument('--vocab_size', type=int, default=512, help='bpe: vocabulary size (an upper bound: merges stop when words are whole)')
    p.add_argument('--edges', type=float, default=0.0, help='shapes: share of clips whose object reaches the edge '
                   'it moves to and stops there (0.25 helped right-angle stories and cost caption accuracy: '
                   'RESULTS.md)')
    p.add_argument('--wrap', type=float, default=0.0, help='shapes: share of clips whose object starts whole '
                   'anywhere and wraps round the canvas, leaving one edge and coming back at the opposite one (so '
                   "that a story's later prompt can move it from anywhere; pipeline.sh: 0.125)")
    p.add_argument('--holdout_phrasings', action=argparse.BooleanOptionalAction, default=True,
                   help='shapes: keep HELD_OUT_PHRASINGS and their words out of the training captions, so eval.py '
                        '--phrasing held_out measures wordings the model never read')
    p.add_argument('--text_len', type=int, default=24, help='caption ids are padded or cut to this many tokens')
    return p.parse_args(argv)


def check_args(args) -> None:
    for name, lo in (('size', 16), ('frames', 2), ('stride', 1), ('n_train', 1), ('n_val', 1), ('text_len', 1)):
        if getattr(args, name) < lo:
            raise DataError(f'--{name} must be at least {lo}, got {getattr(args, name)}')
    if not args.fps > 0:
        raise DataError(f'--fps must be positive, got {args.fps}')
    if not 0 <= args.val_frac < 1:
        raise DataError(f'--val_frac must be in [0, 1), got {args.val_frac}')
    if args.dataset == 'folder' and not args.src:
        raise DataError('--dataset folder needs --src (a video file or a directory of videos)')
    if args.dataset == 'shapes' and args.src:
        raise DataError('--dataset shapes is procedural and takes no --src')
    if args.dataset != 'shapes' and args.holdout:
        raise DataError('--holdout applies to --dataset shapes only')
    for name in ('edges', 'wrap'):
        if not 0 <= getattr(args, name) <= 1:
            raise DataError(f'--{name} is a share of the clips: between 0 and 1, got {getattr(args, name)}')
    if args.edges + args.wrap > 1:
        raise DataError(f'--edges {args.edges} and --wrap {args.wrap} are shares of the same clips: at most 1 together')
    if args.dataset == 'shapes':
        parse_holdout(args.holdout)
    if args.text_encoding == 'bpe' and args.vocab_size < 257:
        raise DataError(f'--vocab_size must be at least 257 (256 bytes + merges), got {args.vocab_size}')
    if args.text_encoding != 'bpe':
        named_encoding(args.text_encoding)
    if args.dataset == 'folder' and not os.path.exists(args.src):
        raise DataError(f'--src {args.src} does not exist')
    bytes_needed = (args.n_train + args.n_val) * args.frames * args.size ** 2 * 3
    if args.dataset != 'folder' and bytes_needed > 2 ** 40:
        raise DataError(f'--n_train/--n_val/--size/--frames ask for {bytes_needed / 2 ** 40:.1f} TiB; make them smaller')


def dataset_flags(args) -> dict:
    """The flags that define the dataset's content: equal flags mean an existing dataset can be reused."""
    keys = {'shapes': ('size', 'frames', 'fps', 'n_train', 'n_val', 'seed', 'holdout', 'holdout_phrasings', 'edges',
                       'wrap'),
            'folder': ('src', 'size', 'frames', 'fps', 'stride', 'val_frac'),
            'mnist': ('src', 'size', 'frames', 'fps', 'n_train', 'n_val', 'seed')}[args.dataset]
    flags = {k: getattr(args, k) for k in keys} | dict(dataset=args.dataset, text_encoding=args.text_encoding,
                                                       vocab_size=args.vocab_size, text_len=args.text_len)
    if flags.get('src'):
        flags['src'] = os.path.abspath(flags['src'])
    if args.dataset == 'shapes':
        flags['holdout'] = ','.join(' '.join(h.values()) for h in parse_holdout(args.holdout))
        flags['captions'] = CAPTIONS_VERSION
        if not flags['wrap']:  # added later: at its default it is left out, so older datasets are reused
            del flags['wrap']
    return flags


def prepare(args) -> str:
    """Write the dataset (atomically) and return its directory."""
    check_args(args)
    name = args.dataset if args.dataset != 'folder' else os.path.splitext(os.path.basename(os.path.normpath(args.src)))[0]
    out = os.path.normpath(args.out or os.path.join('data', name))
    flags = dataset_flags(args)
    if os.path.exists(out):
        old = None
        if os.path.exists(os.path.join(out, 'meta.json')):
            with open(os.path.join(out, 'meta.json')) as f:
                old = json.load(f).get('flags')
        if old == flags and not args.force:
            print(f'{out} already holds this dataset; reusing it (--force rebuilds it)')
            return out
        if not args.force:
            keys = [*flags, *(k for k in old or {} if k not in flags)]  # a flag written or left out at its default
            diff = ', '.join(f'{k}: {old.get(k)!r} -> {flags.get(k)!r}' for k in keys
                             if old and old.get(k) != flags.get(k))
            raise DataError(f'{out} already exists' + (f' with other flags ({diff})' if diff else ' and is not this dataset')
                            + '; pass --force to replace it or --out to write elsewhere')
    parent, base = os.path.dirname(os.path.abspath(out)), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # leftovers of a killed run
        if stale.startswith(f'.{base}.tmp-') or stale.startswith(f'.{base}.old-'):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = os.path.join(parent, f'.{base}.tmp-{os.getpid()}')
    os.makedirs(tmp)
    t0 = time.time()
    try:
        made = {'shapes': make_shapes, 'folder': make_folder, 'mnist': make_mnist}[args.dataset](args, tmp)
        text = make_text_meta(made['train']['captions'], args.text_encoding, args.vocab_size, args.text_len)
        cut = {}
        for split in ('train', 'val'):
            ids, cut[split] = encode_captions(made[split]['captions'], text)
            np.save(os.path.join(tmp, f'{split}_ids.npy'), ids)
            with open(os.path.join(tmp, f'{split}_captions.txt'), 'w') as f:
                f.write('\n'.join(made[split]['captions']))
        if text['ranks'] is not None:
            with open(os.path.join(tmp, 'vocab.tiktoken'), 'w') as f:
                f.write(text['ranks'])
        meta = dict(version=FORMAT_VERSION, dataset=args.dataset, frames=args.frames, size=args.size, fps=args.fps,
                    channels=3, counts={s: made[s]['n'] for s in ('train', 'val')}, text_len=args.text_len,
                    text=text, captions_cut=cut, holdout=flags.get('holdout', ''), flags=flags,
                    words=made.get('words') or caption_words(made['train']['captions']),
                    holdout_phrasings=bool(flags.get('holdout_phrasings')),
                    report=made.get('report', {}))
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(out):  # --force: swap the new dataset in, then drop the old one
            old = os.path.join(parent, f'.{base}.old-{os.getpid()}')
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.time() - t0
    n = sum(meta['counts'].values())
    nbytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out}: {meta['counts']['train']} train + {meta['counts']['val']} val clips of "
          f"{args.frames}x{args.size}x{args.size}, {nbytes / 1e6:.1f} MB in {dt:.1f}s ({n / dt:.0f} clips/s); "
          f"text: {text['name']}, {text['vocab_size']} tokens, text_len {args.text_len}")
    if any(cut.values()):
        print(f"captions cut to --text_len {args.text_len}: {cut['train']} train, {cut['val']} val "
              '(raise --text_len to keep them whole)')
    rep = meta['report']
    if rep:
        print(f"videos: {rep['videos']} found, {rep['captioned_videos']} captioned, {len(rep['skipped'])} unreadable"
              + (f" ({', '.join(rep['skipped'])})" if rep['skipped'] else '')
              + (f", {len(rep['too_short'])} too short ({', '.join(rep['too_short'])})" if rep['too_short'] else ''))
    return out


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        prepare(args)
    except DataError as e:
        print(f'prepare_data.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

