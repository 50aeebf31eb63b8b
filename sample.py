"""
Text to video with a trained prior: prompt -> BPE ids -> prior.generate -> tokenizer.decode -> files.

    python sample.py --ckpt out/prior/ckpt.pt --prompt "a big red circle moving left" --num_samples 8 --seed 0
    python sample.py --ckpt out/prior/ckpt.pt --story "a red circle moving left|a red circle moving up" --frames 33
    python sample.py --ckpt out/prior/ckpt.pt --prompt "a blue box moving down" --image first_frame.png

Writes, per prompt, a GIF (and MP4) and a raw .npy (T, H, W, 3) uint8 per sample, a PNG contact sheet
(a row per sample), and one line per sample in samples.jsonl (file, prompt, seed, settings), so every
sample can be reproduced and judged. Videos longer than the training clip are made through a sliding
window over latent frames, keeping --context latent frames of the last window; a story gives each
window its own prompt.
"""
import argparse
import json
import os
import re
import sys
import time

import imageio.v3 as iio
import numpy as np
import torch

import prepare_data
import prior as prior_lib
import train


class SampleError(Exception):
    pass


def encode_prompts(prompts: list[str], text_meta: dict) -> torch.Tensor:
    """Prompts -> (n, text_len) ids, refusing empty or too long ones."""
    enc, L, pad = prepare_data.get_encoding(text_meta), text_meta['text_len'], text_meta['pad_id']
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        if not p.strip():
            raise SampleError('empty prompt; give some text, e.g. --prompt "a big red circle moving left"')
        toks = enc.encode_ordinary(p)
        if len(toks) > L:
            raise SampleError(f'prompt "{p}" is {len(toks)} tokens; this model reads at most {L}')
        ids[i, :len(toks)] = torch.tensor(toks)
    return ids


def load_tokenizer(ckpt: dict, device: str):
    import tokenizer as tokenizer_lib
    tok = tokenizer_lib.Tokenizer(tokenizer_lib.TokenizerConfig(**ckpt['tokenizer']['config']))
    tok.load_state_dict(ckpt['tokenizer']['model'])
    return tok.to(device).eval()


@torch.no_grad()
def generate_codes(model, ids_per_window: list[torch.Tensor], n_latent: int, context: int, prefix=None,
                   generator=None, turn_context: int | None = 1, **kw) -> torch.Tensor:
    """Latent codes (B, n_latent, h, w): the first window from scratch (or from prefix), then windows that
    keep the last `context` latent frames and add the rest, each with its own prompt ids. A window whose
    prompt differs from the last one's (a story's next part) keeps only the last `turn_context` latent
    frames (None: `context`) and is guided on all its frames (ar): the new prompt then steers the motion
    while the object stays where it was (on shapes, second-segment accuracy 0.20 -> 0.96 for ar)."""
    codes = model.generate(ids_per_window[0], prefix=prefix, generator=generator, **kw)  # (B, t, h, w)
    w = 1
    while codes.shape[1] < n_latent:
        ids = ids_per_window[min(w, len(ids_per_window) - 1)]
        turn = not torch.equal(ids, ids_per_window[min(w - 1, len(ids_per_window) - 1)])
        keep = turn_context if turn and turn_context else context
        nxt = model.generate(ids, prefix=codes[:, -keep:], generator=generator,
                             **dict(kw, guide_frames=model.config.grid[0]) if turn else kw)
        codes = torch.cat([codes, nxt[:, keep:]], 1)
        w += 1
    return codes[:, :n_latent]


def windows_needed(n_latent: int, t: int, context: int) -> int:
    return 1 + max(0, -(-(n_latent - t) // (t - context)))


def story_windows(parts: list[str], n_win: int) -> list[str]:
    """The prompt of each window: a story's parts share the windows out in order, as evenly as they can."""
    return [parts[min(k * len(parts) // n_win, len(parts) - 1)] for k in range(n_win)]


def window_start_frame(k: int, t: int, context: int, ft: int) -> int:
    """The first video frame that window k (k >= 1) adds; window 0 makes frames 0 .. 1 + ft * (t - 1)."""
    first_latent = t + (k - 1) * (t - context)
    return 1 + ft * (first_latent - 1)


def slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')[:60] or 'prompt'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', default='out/prior/ckpt.pt', help='a prior checkpoint written by train.py --model=prior')
    p.add_argument('--prompt', action='append', default=[], help='a prompt (repeatable)')
    p.add_argument('--prompts', default=None, help='a file with one prompt per line')
    p.add_argument('--story', default=None, help="prompts for consecutive windows, separated by '|' (needs --frames)")
    p.add_argument('--image', default=None, help='an image file used as the first frame (image to video)')
    p.add_argument('--num_samples', type=int, default=4, help='samples per prompt')
    p.add_argument('--frames', type=int, default=None, help='frames per video, 1 + 4k (default: the training clip)')
    p.add_argument('--context', type=int, default=None, help='latent frames kept between windows (default half a window)')
    p.add_argument('--turn_context', type=int, default=1,
                   help="latent frames kept where a story's prompt changes (fewer let the new prompt steer)")
    p.add_argument('--cfg', type=float, default=None, help="classifier-free guidance scale, 1 = none (default: the mode's)")
    p.add_argument('--temperature', type=float, default=None,
                   help="sampling temperature, 0 = greedy (default: the mode's, prior.SAMPLING)")
    p.add_argument('--top_k', type=int, default=None, help='ar: sample among the k most likely tokens')
    p.add_argument('--top_p', type=float, default=None, help='ar: nucleus sampling mass')
    p.add_argument('--steps', type=int, default=12, help='mask: parallel decoding steps')
    p.add_argument('--first_steps', type=int, default=None,
                   help='mask: steps that draw the first latent frame alone before the rest (default a third; 0 = all at once)')
    p.add_argument('--refine_steps', type=int, default=None,
                   help="mask: steps after --steps that redraw the first latent frame from the whole clip (default: the mode's, 2)")
    p.add_argument('--refine_cfg', type=float, default=None,
                   help="mask: guidance scale of the redraw steps (default: the mode's, 1 = the conditional model alone)")
    p.add_argument('--guide_frames', type=int, default=None,
                   help="ar: guide only the first N latent frames of each window (default: the mode's, 1)")
    p.add_argument('--seed', type=int, default=0, help='seed: the same seed and flags give the same videos')
    p.add_argument('--out', default='samples', help='output directory')
    p.add_argument('--device', default='cpu', help='cpu, cuda, ...')
    p.add_argument('--no_mp4', action='store_true', help='skip the MP4 files')
    args = p.parse_args(argv)
    try:
        run(args)
    except (SampleError, train.TrainError, ValueError) as e:
        print(f'sample.py: error: {e}', file=sys.stderr)
        return 2
    return 0


def run(args):
    if not os.path.exists(args.ckpt):
        raise SampleError(f'no checkpoint at {args.ckpt}; train one with python train.py --model=prior '
                          f'(after python train.py --model=tokenizer)')
    model, ckpt = train.load_model(args.ckpt, args.device)
    if ckpt['model_type'] != 'prior':
        raise SampleError(f"{args.ckpt} is a {ckpt['model_type']} checkpoint; sample.py needs a prior")
    tok = load_tokenizer(ckpt, args.device)
    meta = ckpt['data_meta']
    t, h, w = model.config.grid
    ft, fs = tok.config.factors
    frames = args.frames or 1 + ft * (t - 1)
    if frames < 1 or (frames - 1) % ft:
        raise SampleError(f'--frames must be 1 + {ft}k (e.g. {1 + ft * (t - 1)} or {1 + ft * (2 * t - 1)}), got {frames}')
    n_latent = 1 + (frames - 1) // ft
    context = args.context if args.context is not None else (t + 1) // 2
    if not 1 <= context < t:
        raise SampleError(f'--context must be between 1 and {t - 1} latent frames, got {context}')
    if not 1 <= args.turn_context < t:
        raise SampleError(f'--turn_context must be between 1 and {t - 1} latent frames, got {args.turn_context}')
    prompts = list(args.prompt)
    if args.prompts:
        with open(args.prompts) as f:
            prompts += [ln.strip() for ln in f if ln.strip()]
    story = [s.strip() for s in args.story.split('|')] if args.story else None
    if story:
        prompts.append(' | '.join(story))
    if not prompts:
        raise SampleError('give --prompt, --prompts or --story')
    prefix = None
    if args.image:
        img = np.asarray(iio.imread(args.image))[..., :3]
        res = ckpt['data_key']['resolution']
        img = prepare_data.resize_crop(img[None], res)  # (1, res, res, 3)
        prefix = tok.encode(prepare_data.to_model(img[None])[:, :, 0].to(args.device))  # (1, 1, h, w)
    os.makedirs(args.out, exist_ok=True)
    if args.guide_frames is not None and model.config.mode != 'ar':
        raise SampleError('--guide_frames is for ar priors; a mask prior guides every decoding step')
    if args.first_steps is not None and model.config.mode != 'mask':
        raise SampleError('--first_steps is for mask priors; an ar prior draws the first latent frame first anyway')
    if args.refine_steps is not None and model.config.mode != 'mask':
        raise SampleError('--refine_steps is for mask priors')
    if args.refine_cfg is not None and model.config.mode != 'mask':
        raise SampleError('--refine_cfg is for mask priors')
    if model.config.mode == 'mask':  # record the value used, not None
        args.first_steps = prior_lib.mask_first_steps(args.steps, args.first_steps)
    for k, v in prior_lib.SAMPLING[model.config.mode].items():  # record the values used, not None
        if getattr(args, k) is None:
            setattr(args, k, v)
    if model.config.mode == 'mask' and prefix is not None:  # a given first frame is kept, never redrawn
        args.refine_steps = 0
    settings = dict(cfg=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, steps=args.steps,
                    guide_frames=args.guide_frames, first_steps=args.first_steps, refine_steps=args.refine_steps,
                    refine_cfg=args.refine_cfg, frames=frames, context=context, turn_context=args.turn_context,
                    mode=model.config.mode, ckpt=args.ckpt, image=args.image)
    with open(os.path.join(args.out, 'samples.jsonl'), 'a') as manifest:
        for pi, prompt in enumerate(prompts):
            write_prompt(args, model, tok, meta, pi, prompt, story if (story and pi == len(prompts) - 1) else [prompt],
                         prefix, n_latent, context, settings, manifest)


def write_prompt(args, model, tok, meta, pi, prompt, parts, prefix, n_latent, context, settings, manifest):
    """Generate --num_samples videos for one prompt (or story) and write them."""
    t = model.config.grid[0]
    n_win = windows_needed(n_latent, t, context)
    per_window = story_windows(parts, n_win)
    ids = [encode_prompts([s], {**meta['text'], 'text_len': meta['text_len']}).repeat(args.num_samples, 1).to(args.device)
           for s in per_window]
    g = torch.Generator(device=args.device).manual_seed(args.seed + pi)
    t0 = time.time()
    codes = generate_codes(model, ids, n_latent, context, None if prefix is None else prefix.repeat(args.num_samples, 1, 1, 1),
                           generator=g, turn_context=args.turn_context, cfg=args.cfg, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, steps=args.steps, guide_frames=args.guide_frames,
                           first_steps=args.first_steps, refine_steps=args.refine_steps, refine_cfg=args.refine_cfg)
    videos = prepare_data.to_uint8(tok.decode(codes))  # (n, T, H, W, 3)
    dt = (time.time() - t0) / args.num_samples
    name = slug(prompt)
    for k, v in enumerate(videos):
        base = os.path.join(args.out, f'{name}_{k}')
        np.save(base + '.npy', v)
        prepare_data.write_video(base + '.gif', v, meta['fps'], scale=4)
        if not args.no_mp4:
            prepare_data.write_video(base + '.mp4', v, meta['fps'], scale=4)
        manifest.write(json.dumps(dict(file=base + '.npy', prompt=prompt, windows=per_window, seed=args.seed + pi,
                                       index=k, **settings)) + '\n')
    iio.imwrite(os.path.join(args.out, f'{name}.png'), prepare_data.contact_sheet(videos))
    print(f'{prompt!r}: {args.num_samples} videos of {videos.shape[1]} frames, {dt:.2f} s per video -> {args.out}/{name}_*')


if __name__ == '__main__':
    sys.exit(main())
