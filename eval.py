"""
Measure a trained model on the validation split.

    python eval.py --ckpt out/tokenizer/ckpt.pt        # PSNR, SSIM, codebook use, shapes-reader accuracy
    python eval.py --ckpt out/prior/ckpt.pt            # caption accuracy of generated videos (shapes)

Tokenizer: reconstruct --n validation clips and report PSNR and SSIM (mean over clips), the share of
the codebook in use, and, on shapes data, the share of reconstructions the shapes reader reads back
with the same four attributes as the original clip.
Prior: generate --samples_per_prompt videos for each of --n_prompts shapes captions (all 192 by default),
read them back with the shapes reader, and report per-attribute and all-four accuracy and the invalid
share, overall and for the combinations the training data held out.
"""
import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import prepare_data
import prior as prior_lib
import train


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image of float (N, C, H, W) in [0, 1], 11x11 Gaussian window (sigma 1.5), valid region."""
    g = torch.exp(-(torch.arange(11, dtype=torch.float32) - 5) ** 2 / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).to(a)[None, None].repeat(a.shape[1], 1, 1, 1)
    blur = lambda x: F.conv2d(x, w, groups=a.shape[1])
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def eval_tokenizer(model, ckpt, data_dir: str, n: int, batch_size: int, device: str, dtype: str) -> dict:
    val = prepare_data.load_split(data_dir, 'val')
    res = ckpt['data_key']['resolution']
    n = min(n, len(val['clips']))
    ctx = torch.autocast(device.split(':')[0], dtype=torch.bfloat16) if dtype == 'bfloat16' else torch.autocast('cpu', enabled=False)
    psnr, ssims, used = [], [], torch.zeros(model.codebook_size, dtype=torch.bool)
    same, valid_orig, t0 = 0, 0, time.time()
    shapes = val['meta']['dataset'] == 'shapes'
    for i in range(0, n, batch_size):
        x, _ = prepare_data.get_batch(val, 0, res, idx=np.arange(i, min(n, i + batch_size)))
        x = x.to(device)
        with ctx:
            codes = model.encode(x)
            rec = model.decode(codes).float()
        used[codes.flatten().cpu()] = True
        a, b = (x + 1) / 2, (rec + 1) / 2
        mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnr += (10 * torch.log10(1 / mse)).tolist()
        B, C, T, H, W = a.shape
        frames = lambda v: v.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)  # (B*T, C, H, W)
        ssims += ssim(frames(a), frames(b)).view(B, T).mean(1).tolist()
        if shapes:
            for o, r in zip(prepare_data.to_uint8(x), prepare_data.to_uint8(rec)):
                ro, rr = prepare_data.read_clip(o), prepare_data.read_clip(r)
                valid_orig += ro['valid']
                same += ro['valid'] and ro == rr
    out = dict(clips=n, psnr=float(np.mean(psnr)), ssim=float(np.mean(ssims)),
               codebook_used=int(used.sum()), codebook_size=model.codebook_size,
               codebook_usage=float(used.float().mean()), seconds=round(time.time() - t0, 1), dtype=dtype)
    if shapes:
        out['reader_accuracy'] = same / max(valid_orig, 1)
    return out


@torch.no_grad()
def eval_prior(model, ckpt, n_prompts: int, per_prompt: int, batch_size: int, device: str, seed: int, **kw) -> dict:
    import sample
    meta = ckpt['data_meta']
    if meta['dataset'] != 'shapes':
        raise train.TrainError('caption accuracy needs a model trained on shapes data')
    tok = sample.load_tokenizer(ckpt, device)
    combos = [dict(zip(prepare_data.ATTRIBUTES, c)) for c in prepare_data.COMBOS]
    if n_prompts < len(combos):
        combos = [combos[i] for i in np.random.default_rng(seed).choice(len(combos), n_prompts, replace=False)]
    holdout = prepare_data.parse_holdout(meta.get('holdout', ''))
    prompts = [prepare_data.caption(a) for a in combos for _ in range(per_prompt)]
    text_meta = {**meta['text'], 'text_len': meta['text_len']}
    videos, g, t0 = [], torch.Generator(device=device).manual_seed(seed), time.time()
    for i in range(0, len(prompts), batch_size):
        ids = sample.encode_prompts(prompts[i:i + batch_size], text_meta).to(device)
        videos.append(prepare_data.to_uint8(tok.decode(model.generate(ids, generator=g, **kw))))
    videos = np.concatenate(videos)
    out = {'all_prompts': prepare_data.caption_accuracy(videos, prompts)}
    if holdout:
        held = np.array([prepare_data.is_held_out(prepare_data.parse_caption(p), holdout) for p in prompts])
        for name, pick in (('seen', ~held), ('held_out', held)):
            out[name] = prepare_data.caption_accuracy(videos[pick], [p for p, k in zip(prompts, pick) if k])
    out['seconds_per_video'] = (time.time() - t0) / len(prompts)
    return out


OPPOSITE = {'left': 'right', 'right': 'left', 'up': 'down', 'down': 'up'}


@torch.no_grad()
def eval_story(model, ckpt, n_stories: int, frames: int, cut: int | None, batch_size: int, device: str, seed: int,
               turn_context: int = 1, **kw) -> dict:
    """Two-prompt stories: one object that turns round, its motion changing from A's to the opposite in B,
    made through the sliding window; B's windows start at frame `cut` (None: after one clip; 0: the even
    split of sample.py --story "A|B"). Each segment is judged on its first training-length clip. A shape
    of the training clips travels 0.35-0.5 of the canvas in a clip and never leaves it, so it can keep
    going one way for about one clip; after that, turning round is the one motion it has room for."""
    import sample
    meta, tok = ckpt['data_meta'], sample.load_tokenizer(ckpt, device)
    t = model.config.grid[0]
    ft = tok.config.factors[0]
    clip = 1 + ft * (t - 1)
    if frames <= clip or (frames - 1) % ft:
        raise train.TrainError(f'--story_frames must be 1 + {ft}k and more than the {clip} of a clip, got {frames}')
    n_latent, context = 1 + (frames - 1) // ft, (t + 1) // 2
    if not 1 <= turn_context < t:
        raise train.TrainError(f'--turn_context must be between 1 and {t - 1} latent frames, got {turn_context}')
    n_win = sample.windows_needed(n_latent, t, context)
    starts = [sample.window_start_frame(k, t, context, ft) for k in range(1, n_win)]
    if cut is None:
        cut = clip
    elif cut == 0:
        cut = starts[sample.story_windows(['A', 'B'], n_win).index('B') - 1]
    if cut not in starts:
        raise train.TrainError(f'--story_cut must be a frame where a window starts, one of {starts}, got {cut}')
    windows = ['A' if k == 0 or starts[k - 1] < cut else 'B' for k in range(n_win)]  # A is frames [0, cut)
    if cut + clip > frames:
        raise train.TrainError(f'--story_frames {frames} leaves the second prompt fewer than {clip} frames; give more')
    rng = np.random.default_rng(seed)
    stories = []
    for _ in range(n_stories):
        a = dict(zip(prepare_data.ATTRIBUTES, prepare_data.COMBOS[rng.integers(len(prepare_data.COMBOS))]))
        b = dict(a, motion=OPPOSITE[a['motion']])
        stories.append((prepare_data.caption(a), prepare_data.caption(b)))
    text_meta = {**meta['text'], 'text_len': meta['text_len']}
    g, t0, seg_a, seg_b = torch.Generator(device=device).manual_seed(seed), time.time(), [], []
    for i in range(0, n_stories, batch_size):
        part = stories[i:i + batch_size]
        ids = [sample.encode_prompts([s[w == 'B'] for s in part], text_meta).to(device)
               for w in windows]
        codes = sample.generate_codes(model, ids, n_latent, context, generator=g, turn_context=turn_context, **kw)
        videos = prepare_data.to_uint8(tok.decode(codes))  # (n, frames, H, W, 3)
        seg_a.append(videos[:, :clip])
        seg_b.append(videos[:, cut:cut + clip])
    return {'frames': frames, 'segment_frames': [[0, cut], [cut, frames]],
            'segment_1': prepare_data.caption_accuracy(np.concatenate(seg_a), [s[0] for s in stories]),
            'segment_2': prepare_data.caption_accuracy(np.concatenate(seg_b), [s[1] for s in stories]),
            'seconds_per_video': (time.time() - t0) / n_stories}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', required=True, help='checkpoint written by train.py')
    p.add_argument('--data', default=None, help='dataset directory (default: the one the model was trained on)')
    p.add_argument('--n', type=int, default=512, help='validation clips to measure')
    p.add_argument('--batch_size', type=int, default=32, help='clips per forward pass')
    p.add_argument('--device', default='cpu', help='cpu, cuda, ...')
    p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16'],
                   help='autocast dtype for the model (auto: bfloat16 where it is native, as in train.py, else float32)')
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    p.add_argument('--n_prompts', type=int, default=192, help='prior: shapes captions to prompt with (a random subset below 192)')
    p.add_argument('--samples_per_prompt', type=int, default=2, help='prior: videos per caption')
    p.add_argument('--cfg', type=float, default=None, help="prior: guidance scale (default: the mode's)")
    p.add_argument('--temperature', type=float, default=None, help="prior: sampling temperature (default: the mode's)")
    p.add_argument('--top_k', type=int, default=None, help='prior (ar): top-k')
    p.add_argument('--steps', type=int, default=12, help='prior (mask): decoding steps')
    p.add_argument('--guide_frames', type=int, default=None, help="prior (ar): guided latent frames (default: the mode's)")
    p.add_argument('--first_steps', type=int, default=None, help='prior (mask): steps that draw the first latent frame '
                   'alone (default a third of --steps; 0 = every frame at once)')
    p.add_argument('--refine_steps', type=int, default=None, help="prior (mask): steps after --steps that redraw the "
                   "first latent frame from the whole clip (default: the mode's)")
    p.add_argument('--refine_cfg', type=float, default=None, help="prior (mask): guidance scale of the redraw steps "
                   "(default: the mode's)")
    p.add_argument('--seed', type=int, default=0, help='prior: sampling seed')
    p.add_argument('--story', type=int, default=0, help='prior: measure this many two-prompt stories instead (long videos)')
    p.add_argument('--story_frames', type=int, default=65, help='prior: frames of each story video')
    p.add_argument('--story_cut', type=int, default=None, help='prior: the frame where the second prompt '
                   'starts (default: after one training clip; 0 = the even split of sample.py --story)')
    p.add_argument('--turn_context', type=int, default=1, help='prior: latent frames kept where the prompt changes '
                   '(as sample.py --turn_context)')
    args = p.parse_args(argv)
    if args.dtype == 'auto':  # float16 is train.py's pick on CUDA without bfloat16; eval.py measures in float32 there
        args.dtype = 'bfloat16' if train.auto_dtype(args.device.split(':')[0]) == 'bfloat16' else 'float32'
    try:
        model, ckpt = train.load_model(args.ckpt, args.device)
        data = args.data or ckpt['args']['data']
        name = ckpt['model_type']
        if name == 'tokenizer':
            out = eval_tokenizer(model, ckpt, data, args.n, args.batch_size, args.device, args.dtype)
        elif name == 'prior':
            if args.guide_frames is not None and model.config.mode != 'ar':
                raise train.TrainError('--guide_frames is for ar priors')
            if args.first_steps is not None and model.config.mode != 'mask':
                raise train.TrainError('--first_steps is for mask priors')
            if args.refine_steps is not None and model.config.mode != 'mask':
                raise train.TrainError('--refine_steps is for mask priors')
            if args.refine_cfg is not None and model.config.mode != 'mask':
                raise train.TrainError('--refine_cfg is for mask priors')
            if model.config.mode == 'mask':  # record the value used, not None
                args.first_steps = prior_lib.mask_first_steps(args.steps, args.first_steps)
            for k, v in prior_lib.SAMPLING[model.config.mode].items():  # record the values used, not None
                if getattr(args, k) is None:
                    setattr(args, k, v)
            kw = dict(cfg=args.cfg, temperature=args.temperature, top_k=args.top_k, steps=args.steps,
                      guide_frames=args.guide_frames, first_steps=args.first_steps, refine_steps=args.refine_steps,
                      refine_cfg=args.refine_cfg)
            # --dtype bfloat16 autocasts the sampler (transformer and decoder) as it does the tokenizer's metrics
            with torch.autocast(args.device.split(':')[0], dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16'):
                if args.story:
                    out = eval_story(model, ckpt, args.story, args.story_frames, args.story_cut, args.batch_size,
                                     args.device, args.seed, turn_context=args.turn_context, **kw)
                else:
                    out = eval_prior(model, ckpt, args.n_prompts, args.samples_per_prompt, args.batch_size,
                                     args.device, args.seed, **kw)
            out['settings'] = dict(kw, seed=args.seed, mode=model.config.mode, dtype=args.dtype)
        else:
            raise train.TrainError(f'eval.py does not measure {name} checkpoints yet')
    except (train.TrainError, FileNotFoundError, ValueError) as e:
        print(f'eval.py: error: {e}', file=sys.stderr)
        return 2
    fmt = lambda d: ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in d.items())
    if name == 'prior':
        for k, v in out.items():
            print(f'{k}: {fmt(v)}' if isinstance(v, dict) else f'{k}: {v:.3g}' if isinstance(v, float) else f'{k}: {v}')
    else:
        print(f"{name} {args.ckpt} on {data} val: " + fmt(out))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
