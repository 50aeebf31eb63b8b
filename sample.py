"""
Text to video: prompt -> ids -> a generator -> the tokenizer's decoder (codes, latents) -> upsamplers -> files.

    python sample.py --ckpt out/pipeline_ar/ckpt.pt --prompt "a big red circle moving left" --num_samples 8 --seed 0
    python sample.py --ckpt out/pipeline_ar/ckpt.pt --frames 33 --story "a red ball moving left|a red ball moving up"
    python sample.py --ckpt out/film_ar/ckpt.pt --num_samples 4        # a model of uncaptioned videos: no prompt
    python sample.py --ckpt out/pipeline_ar/ckpt.pt --prompt "a blue box moving down" --image first_frame.png
    python sample.py --ckpt out/pipeline_ar/ckpt.pt --prompt "a red ball moving up" --superres out/superres/ckpt.pt
    python sample.py --ckpt out/pipeline_diffusion/ckpt.pt --prompt "a big red circle moving left" --steps 32

Writes, per prompt, a GIF (and MP4) and a raw .npy (T, H, W, 3) uint8 per sample, a PNG contact sheet (a row
per sample), and one line per sample in samples.jsonl (file, prompt, seed, settings), so every sample can be
reproduced and judged. Videos longer than the training clip are made through a sliding window over latent
frames (frames, for a model of pixels), keeping --context of them from the last window, decoded and encoded
again, and on data that wraps round the canvas rolled to put the object in the middle; a story shares the
frames out between its prompts. Prompts are normalised (prepare_data.normalize_text) and checked against the
words of the training captions.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import imageio.v3 as iio
import numpy as np
import torch

import prepare_data
import tokenizer
import train

SETTINGS = ('cfg', 'temperature', 'top_k', 'top_p', 'guide_frames', 'kv_cache', 'steps', 'first_steps', 'refine_steps',
            'refine_cfg', 'sampler', 'eta')  # generators' sampling settings: each model takes its own


class SampleError(Exception):
    pass


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags of SETTINGS (eval.py and bench.py take them too); a flag not given is not in args."""
    g = p.add_argument_group("sampling settings (default: the model's; a flag of the other mode is an error)",
                             argument_default=argparse.SUPPRESS)
    g.add_argument('--cfg', type=float, help='classifier-free guidance scale, 1 = none (ar and mask: 2, diffusion: 4)')
    g.add_argument('--temperature', type=float, help='ar, mask: sampling temperature, 0 = greedy (ar: 0.4, mask: 0.3)')
    g.add_argument('--top_k', type=int, help='ar: sample among the k most likely tokens')
    g.add_argument('--top_p', type=float, help='ar: nucleus sampling mass')
    g.add_argument('--guide_frames', type=int, help='ar: guide only the first N latent frames of each window (1)')
    g.add_argument('--kv_cache', action=argparse.BooleanOptionalAction, help='ar: a KV cache (on), or recompute all')
    g.add_argument('--steps', type=int, help='mask: parallel decoding steps (12); diffusion: solver steps (16)')
    g.add_argument('--sampler', choices=['ddim', 'dpm'], help='diffusion: DDIM or DPM-Solver++ 2M (dpm)')
    g.add_argument('--eta', type=float, help="diffusion: DDIM's share of fresh noise per step (0: deterministic)")
    g.add_argument('--first_steps', type=int,
                   help='mask: steps that draw the first latent frame alone before the rest (a third; 0 = all at once)')
    g.add_argument('--refine_steps', type=int, help='mask: steps after --steps that redraw the first latent frame (2)')
    g.add_argument('--refine_cfg', type=float, help='mask: guidance scale of the redraw steps (1 = none)')


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument('--device', default='auto', help='auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps')
    p.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help="autocast dtype; auto as train.py's: bfloat16 where it is native, else float16 on CUDA, "
                        'float32 on other CPUs')


def load(path: str, device: str):
    """The generator a checkpoint holds, in eval mode, and the tokenizer it reads codes of (None for pixels)."""
    ckpt = train.read_checkpoint(path, 'train one with python train.py --model=prior (see README.md)')
    model = train.load_model(ckpt, device)
    if model.kind != 'generator':
        raise SampleError(f"{path} is a {ckpt['model_type']} checkpoint; sampling needs a generator such as a prior "
                          '(python train.py --model=prior)' + ('; an upsampler goes to --superres'
                                                               if model.kind == 'upsampler' else ''))
    return model, tokenizer_of(model, ckpt, device), ckpt


def load_upsamplers(paths: list[str], device: str) -> list:
    """The upsamplers of --superres, in the order they apply."""
    models = []
    for path in paths:
        ckpt = train.read_checkpoint(path, 'train one with python train.py --model=superres')
        model = train.load_model(ckpt, device)
        if model.kind != 'upsampler':
            raise SampleError(f"--superres {path} is a {ckpt['model_type']} checkpoint, not an upsampler "
                              '(python train.py --model=superres)')
        models.append(model)
    return models


def upsample(videos, upsamplers: list, generator=None, noise: float = 0.0):
    """videos (B, 3, T, H, W) through each upsampler in turn (space, time, or one after the other)."""
    for sr in upsamplers:
        videos = sr.sample(None, videos, generator=generator, noise=noise)
    return videos


def tokenizer_of(model, ckpt: dict, device: str):
    """The tokenizer whose codes or latents a model reads, which its checkpoint carries; None for a model of pixels."""
    if model.reads == 'pixels':
        return None
    return train.to_device(tokenizer.Tokenizer.from_checkpoint(ckpt['tokenizer']), device).eval()


def encode_prompts(prompts: list[str], meta: dict) -> torch.Tensor:
    """Prompts -> (n, text_len) ids, refusing too long ones; the empty prompt '' is the unconditional one (pads)."""
    L, pad = meta['text_len'], meta['text']['pad_id']
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    for i, (p, toks) in enumerate(zip(prompts, prepare_data.text_tokens(prompts, meta['text']))):
        if len(toks) > L:
            raise SampleError(f'prompt "{p}" is {len(toks)} tokens; this model reads at most {L}')
        ids[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
    return ids


def wraps(meta: dict) -> bool:
    """Whether the model's data wraps round the canvas (prepare_data.py --wrap): its windows may be rolled."""
    return meta.get('flags', {}).get('wrap', 0) > 0


def captioned(meta: dict) -> bool:
    """Whether the model's training clips had captions (datasets before meta['words'] are taken to have them)."""
    if 'words' in meta:
        return bool(meta['words'])
    return meta.get('report', {}).get('captioned_videos', 1) > 0


def unknown_words(prompt: str, meta: dict) -> list[str]:
    """The prompt's words that no training caption contains ([] when the data does not list its words)."""
    known = set(meta.get('words') or ())
    return [w for w in dict.fromkeys(prepare_data.normalize_text(prompt).split()) if known and w not in known]


def check_prompt(prompt: str, meta: dict) -> None:
    """Refuse a prompt the model cannot read at all, and warn about the words it never saw in training."""
    words = prepare_data.normalize_text(prompt).split()
    unknown = unknown_words(prompt, meta)
    if words and len(unknown) == len(words):
        known = meta['words']
        listing = ', '.join(known[:80]) + (f' ... ({len(known)} in all)' if len(known) > 80 else '')
        raise SampleError(f'no word of the prompt "{prompt}" is in a training caption, so the model cannot read it; '
                          f'it knows: {listing}')
    if unknown:
        print(f'warning: no training caption has {", ".join(repr(w) for w in unknown)}: the model reads the prompt '
              f'without {"it" if len(unknown) == 1 else "them"} (prompt "{prompt}")', file=sys.stderr)


def time_factor(tok) -> int:
    """Video frames per latent frame after the first: the tokenizer's, 1 for a model of pixels."""
    return 1 if tok is None else tok.config.factors[0]


def story_split(n_parts: int, frames: int, ft: int, split: list[int] | None = None) -> list[int]:
    """The latent frame where each part of a story ends: the video's frames shared out in proportion, or as
    `split` (frames per part, adding up to `frames`) says. Latent frame 0 is one video frame, each later one ft."""
    n_latent = 1 + (frames - 1) // ft
    if split is None:
        ends = [1 + math.ceil(((k + 1) * frames / n_parts - 1) / ft - 0.5) for k in range(n_parts)]  # ties: later
    else:
        if len(split) != n_parts or sum(split) != frames:
            raise SampleError(f'--story_split gives {len(split)} parts and {sum(split)} frames; the story has '
                              f'{n_parts} prompts and {frames} frames')
        if split[0] < 1 or (split[0] - 1) % ft or any(f < ft or f % ft for f in split[1:]):
            raise SampleError(f'--story_split: the first prompt takes 1 + {ft}k frames and each later one a '
                              f'multiple of {ft} (the latent frames of the tokenizer), got {split}')
        ends = list(1 + (sum(split[:k + 1]) - 1) // ft for k in range(n_parts))
    ends[-1] = n_latent
    if any(b <= a for a, b in zip([0] + ends, ends)):
        raise SampleError(f'a story of {n_parts} prompts needs at least {1 + ft * (n_parts - 1)} frames, '
                          f'one latent frame each; got {frames}')
    return ends


def part_frames(ends: list[int], ft: int) -> list[list[int]]:
    """The video frames [start, stop) of each story part from story_split's latent ends."""
    stops = [1 + ft * (e - 1) for e in ends]
    return [[a, b] for a, b in zip([0] + stops, stops)]


@torch.no_grad()
def sample_long(model, tok, ids_per_part: list[torch.Tensor], ends: list[int], context: int, first=None,
                generator=None, turn_context: int = 1, centre: bool = False, **settings) -> torch.Tensor:
    """Clips (B, 3, T, H, W) in [-1, 1] of ends[-1] latent frames (T = 1 + ft * (ends[-1] - 1)). Part k of a
    story (one prompt's ids) makes latent frames up to ends[k]. The first window starts from scratch (or from the
    given first frames `first`, clips (B, 3, 1 + ft * j, H, W) in [-1, 1], which come back exactly); each next
    window keeps the last `context` latent frames and adds the rest. A part's first window keeps only
    `turn_context` and tells the model its prompt is new: the new prompt then
    steers the motion while the object stays where it was. The kept frames go through the tokenizer again, so a
    window starts as the model trained: its first latent frame is one frame alone, not ft. centre (for data
    whose canvas wraps round, prepare_data.py --wrap): each window runs on the canvas rolled to put the kept
    frames' content in the middle, as whole objects with room to move, and is rolled back (stories of 65
    frames: second prompt 0.53 -> 0.99 for ar: RESULTS.md)."""
    ft, video, last, n = time_factor(tok), None, None, 0  # n: latent frames made
    for ids, end in zip(ids_per_part, ends):
        turn = last is not None and not torch.equal(ids, last)
        while n < end:
            if video is None:
                x = None if first is None else train.from_clips(model.reads, tok, first)
                video = put_back(train.to_clips(model.reads, tok, model.sample(ids, x=x, generator=generator,
                                                                               **settings)), first)
                n = 1 + (video.shape[2] - 1) // ft
                continue
            keep = min(turn_context if turn else context, n)
            kept = video[:, :, video.shape[2] - 1 - ft * (keep - 1):]  # latent frames 0 .. keep-1 after encoding
            shift = centring(kept[:, :, -1]) if centre else torch.zeros(len(kept), 2, dtype=torch.long)
            given = train.from_clips(model.reads, tok, roll(kept, shift))
            window = model.sample(ids, x=given, generator=generator, new_prompt=turn, **settings)
            clips = roll(train.to_clips(model.reads, tok, window), -shift)
            video, n, turn = torch.cat([video, clips[:, :, kept.shape[2]:]], 2), n + window.shape[-3] - keep, False
        n, last = end, ids
        video = video[:, :, :1 + ft * (end - 1)]
    return video


def put_back(video: torch.Tensor, first=None, last=None) -> torch.Tensor:
    """The video (B, 3, T, H, W) with the given first and last frames (clips (B, 3, t, H, W)) exactly as given: a
    model keeps them in its own space, where a tokenizer's decoder only approximates them (about 31 dB)."""
    if first is None and last is None:
        return video
    video = video.clone()
    if first is not None:
        video[:, :, :first.shape[2]] = first.to(video.dtype)
    if last is not None:
        video[:, :, video.shape[2] - last.shape[2]:] = last.to(video.dtype)
    return video


def centring(frames: torch.Tensor) -> torch.Tensor:
    """(B, 2) rolls (dy, dx) that bring the circular mean of the lit pixels of frames (B, 3, H, W) in [-1, 1] to
    the middle of a canvas whose opposite edges meet (an object split across an edge comes out whole)."""
    lit = (frames.float().amax(1) > -0.3).float()  # (B, H, W), the shapes reader's threshold
    shifts = []
    for mass in (lit.sum(2), lit.sum(1)):  # (B, H) rows, (B, W) columns
        n = mass.shape[1]
        angle = torch.arange(n, device=mass.device) * (2 * math.pi / n)
        at = torch.atan2((mass * angle.sin()).sum(1), (mass * angle.cos()).sum(1)) * (n / (2 * math.pi))
        shifts.append(torch.where(mass.sum(1) > 0, (n // 2 - at.round().long()) % n, 0))  # empty: stays
    return torch.stack(shifts, 1).cpu()


def roll(clips: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Clips (B, C, T, H, W), each rolled by its own (dy, dx) of shift (B, 2)."""
    if not shift.any():
        return clips
    return torch.stack([c.roll((int(dy), int(dx)), (-2, -1)) for c, (dy, dx) in zip(clips, shift)])


def slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')[:60] or 'unconditional'


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', default='out/prior/ckpt.pt', help='a generator checkpoint written by train.py')
    p.add_argument('--prompt', action='append', default=[], help='a prompt (repeatable); none (or "") samples '
                   'without text, from a model trained on uncaptioned videos or with caption dropout')
    p.add_argument('--prompts', default=None, help='a file with one prompt per line')
    p.add_argument('--story', default=None, help="prompts one after another, separated by '|'; each gets its share "
                   'of --frames (or of --story_split)')
    p.add_argument('--story_split', default=None, help="frames per story prompt, e.g. 17,16 (default: --frames in "
                   'equal shares); sets --frames to their sum')
    p.add_argument('--words', action='store_true', help="print the words of the model's training captions (the "
                   'words it knows) and exit')
    p.add_argument('--image', default=None, help='an image file used as the first frame (image to video)')
    p.add_argument('--num_samples', type=int, default=4, help='samples per prompt')
    p.add_argument('--frames', type=int, default=None, help='frames per video, 1 + 4k; None: the training clip')
    p.add_argument('--context', type=int, default=None, help='latent frames kept between windows; None: half')
    p.add_argument('--turn_context', type=int, default=1,
                   help="latent frames kept where a story's prompt changes (fewer let the new prompt steer)")
    p.add_argument('--no_centre', action='store_true', help='on data that wraps round the canvas, do not roll each '
                   "window to put the object in the middle (a story's later prompt then often fails at the edge)")
    p.add_argument('--seed', type=int, default=0, help='seed: the same seed and flags give the same videos')
    p.add_argument('--out', default='samples', help='output directory')
    p.add_argument('--no_mp4', action='store_true', help='skip the MP4 files')
    p.add_argument('--superres', action='append', default=[], help='an upsampler checkpoint (train.py '
                   '--model=superres) applied to the videos; give it twice to chain space and time')
    p.add_argument('--sr_noise', type=float, default=0.0, help="noise level of the upsamplers' input (their noise "
                   'conditioning augmentation; 0 = none)')
    add_device_flags(p)
    add_sampling_flags(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        run(args)
    except (SampleError, train.TrainError, ValueError) as e:
        print(f'sample.py: error: {e}', file=sys.stderr)
        return 2
    return 0


def run(args):
    args.device = train.auto_device(args.device)
    args.dtype = train.auto_dtype(args.dtype, args.device)
    train.flush_denormals(args.device)
    model, tok, ckpt = load(args.ckpt, args.device)
    upsamplers = load_upsamplers(args.superres, args.device)
    settings = model.settings(**{k: getattr(args, k, None) for k in SETTINGS})  # checked, defaults filled in
    meta = ckpt['data_meta']
    if args.words:
        print(' '.join(meta['words']) if 'words' in meta else 'this checkpoint\'s data does not list its words '
              '(prepared before prepare_data.py wrote them)')
        return
    t, ft = model.config.grid[0], time_factor(tok)
    split = None
    if args.story_split:
        try:
            split = [int(f) for f in args.story_split.split(',')]
        except ValueError:
            raise SampleError(f'--story_split takes frames per story prompt, e.g. 17,16; '
                              f'got {args.story_split}') from None
        if not args.story:
            raise SampleError('--story_split shares the frames of a --story; give --story "p1|p2" too')
        if args.frames is not None and args.frames != sum(split):
            raise SampleError(f'--story_split adds up to {sum(split)} frames but --frames is {args.frames}')
        story_split(len(args.story.split('|')), sum(split), ft, split)  # checked before the frames are
    frames = args.frames or (sum(split) if split else 1 + ft * (t - 1))
    if frames < 1 or (frames - 1) % ft:
        raise SampleError(f'--frames must be 1 + {ft}k (e.g. {1 + ft * (t - 1)} or {1 + ft * (2 * t - 1)}), '
                          f'got {frames}')
    context = args.context if args.context is not None else (t + 1) // 2
    if not 1 <= context < t:
        raise SampleError(f'--context must be between 1 and {t - 1} latent frames, got {context}')
    if not 1 <= args.turn_context < t:
        raise SampleError(f'--turn_context must be between 1 and {t - 1} latent frames, got {args.turn_context}')
    if args.num_samples < 1:
        raise SampleError(f'--num_samples must be at least 1, got {args.num_samples}')
    for flag in ('prompts', 'image'):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            raise SampleError(f'--{flag} {getattr(args, flag)} is not a file')
    prompts = [(p, [p]) for p in args.prompt]
    if args.prompts:
        with open(args.prompts) as f:
            prompts += [(ln.strip(), [ln.strip()]) for ln in f if ln.strip()]
    if args.story:
        parts = [s.strip() for s in args.story.split('|')]
        if not all(parts):
            raise SampleError(f'--story "{args.story}" has an empty part; give a prompt between each pair of |')
        prompts.append((' | '.join(parts), parts))
    prompts = prompts or [('', [''])]  # no prompt: sample without text
    has_text = captioned(meta)
    for part in (part for _, parts in prompts for part in parts):
        if not has_text and part.strip():
            raise SampleError('this model trained on videos without captions, so a prompt means nothing to it; '
                              'run without --prompt, --prompts and --story to sample it')
        if has_text and not part.strip():
            if not getattr(model.config, 'cfg_drop', 0):
                raise SampleError('this model never trained without a caption (cfg_drop 0), so it cannot sample '
                                  'without one; give --prompt, --prompts or --story')
            print('no prompt: sampling without text (the model trained on dropped captions, '
                  f'{model.config.cfg_drop:.0%} of them)', file=sys.stderr)
        elif has_text:
            check_prompt(part, meta)
    if not has_text and 'cfg' in settings:
        settings['cfg'] = 1.0  # no text to guide by: one pass instead of two identical ones
    first = None
    if args.image:  # image to video: the image is the first frame (its codes, latents or pixels the first latent
        #             frame, kept), and comes back exactly
        img = np.asarray(iio.imread(args.image))[None, ..., :3]
        img = prepare_data.resize_crop(img, ckpt['data_key']['resolution'])  # (1, res, res, 3)
        first = prepare_data.to_model(img[None]).to(args.device)  # (1, 3, 1, res, res)
    centre = wraps(meta) and not args.no_centre
    record = dict(settings, frames=frames, context=context, turn_context=args.turn_context,
                  centre=centre, ckpt=args.ckpt, image=args.image, dtype=args.dtype,
                  superres=args.superres, sr_noise=args.sr_noise)
    fps = meta['fps'] * math.prod(sr.config.scale_t for sr in upsamplers)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'samples.jsonl'), 'a') as manifest:
        for i, (prompt, parts) in enumerate(prompts):
            ends = story_split(len(parts), frames, ft, split if len(parts) > 1 else None)
            ids = [encode_prompts([s], meta).repeat(args.num_samples, 1).to(args.device) for s in parts]
            g = torch.Generator(device=args.device).manual_seed(args.seed + i)
            t0 = time.time()
            with train.autocast(args.device, args.dtype):
                given = None if first is None else first.expand(args.num_samples, *first.shape[1:])
                videos = sample_long(model, tok, ids, ends, context, given, generator=g, centre=centre,
                                     turn_context=args.turn_context, **settings)
                videos = prepare_data.to_uint8(upsample(videos, upsamplers, g, args.sr_noise))
            dt = (time.time() - t0) / args.num_samples
            scale_t = videos.shape[1] / frames  # a time upsampler makes more frames
            spans = [[round(a * scale_t), round(b * scale_t)] for a, b in part_frames(ends, ft)]
            write(args, videos, prompt, fps, [dict(prompt=prompt, parts=parts, part_frames=spans, seed=args.seed + i,
                                                   index=k, **record) for k in range(len(videos))], manifest)
            print(f'{prompt!r}: {args.num_samples} videos of {videos.shape[1]} frames, {dt:.2f} s per video '
                  f'-> {args.out}/{slug(prompt)}_*' + (f' (frames per prompt: {spans})' if len(parts) > 1 else ''))


def write(args, videos: np.ndarray, prompt: str, fps: float, records: list[dict], manifest) -> None:
    """Each video as .npy, .gif (and .mp4), a contact sheet of them all, and a line per video in the manifest."""
    name = slug(prompt)
    for k, (v, rec) in enumerate(zip(videos, records)):
        base = os.path.join(args.out, f'{name}_{k}')
        np.save(base + '.npy', v)
        prepare_data.write_video(base + '.gif', v, fps, scale=4)
        if not args.no_mp4:
            prepare_data.write_video(base + '.mp4', v, fps, scale=4)
        manifest.write(json.dumps(dict(file=base + '.npy', **rec)) + '\n')
    iio.imwrite(os.path.join(args.out, f'{name}.png'), prepare_data.contact_sheet(videos))


if __name__ == '__main__':
    sys.exit(main())
