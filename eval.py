"""
Measure a trained model on the validation split.

    python eval.py --ckpt out/pipeline_tokenizer/ckpt.pt    # a codec: PSNR, SSIM, codebook use, shapes reader
    python eval.py --ckpt out/pipeline_ar/ckpt.pt           # a generator: caption accuracy of its videos (shapes)
    python eval.py --ckpt out/pipeline_ar/ckpt.pt --phrasing held_out   # ... of prompts in unseen wordings
    python eval.py --ckpt out/pipeline_ar/ckpt.pt --story 96      # ... of two-prompt stories, per segment
    python eval.py --ckpt out/superres/ckpt.pt              # an upsampler: PSNR, SSIM against fixed upsamplings
    python eval.py --ckpt out/pipeline_ar/ckpt.pt --superres out/superres/ckpt.pt   # caption accuracy after it
    python eval.py --ckpt out/pipeline_diffusion/ckpt.pt --given first     # image to video on validation clips
    python eval.py --ckpt out/pipeline_diffusion/ckpt.pt --given ends      # interpolation between first and last

A codec (the tokenizer) reconstructs --n validation clips: PSNR and SSIM (mean over clips), the share of the
codebook in use, and, on shapes data, the share of reconstructions that the shapes reader reads back with the
original's four attributes. A generator makes --samples_per_prompt videos for each of --n_prompts shapes
captions (all 192 by default): per-attribute and all-four accuracy and the invalid share, overall and apart for
the combinations its training data held out, and the seconds per video; --phrasing held_out words the prompts in
phrasings no training caption uses, and reports each apart (phrasing_1 ... in the order of
prepare_data.HELD_OUT_PHRASINGS). It also counts the commonest mistakes: an attribute asked and read ('square as
circle'), or the reader's reason for an invalid video ('no object (invalid)'). --story measures two-prompt
stories. With --given, a generator is given the first frame (first) or the first and last frames (ends,
diffusion only) of --n validation clips with their captions: the PSNR of the given frames as they come back (put
back as given, as sample.py does) and of the first one as the model's own decoder makes it, the caption accuracy
of the videos, and for ends the PSNR of the frames between against the real clip and against a linear cross-fade
of the two given frames.
"""
import argparse
import collections
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import prepare_data
import sample
import superres
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
def eval_codec(model, ckpt: dict, args) -> dict:
    val = prepare_data.load_split(args.data, 'val')
    res, n = ckpt['data_key']['resolution'], min(args.n, len(val['clips']))
    psnr, ssims, used = [], [], torch.zeros(model.codebook_size, dtype=torch.bool)
    same, valid_orig, t0 = 0, 0, time.time()
    shapes = val['meta']['dataset'] == 'shapes'
    for i in range(0, n, args.batch_size):
        x, _ = prepare_data.get_batch(val, 0, res, idx=np.arange(i, min(n, i + args.batch_size)))
        x = x.to(args.device)
        with train.autocast(args.device, args.dtype):
            codes = model.encode(x)
            rec = model.decode(codes).float()
        used[codes.flatten().cpu()] = True
        a, b = (x + 1) / 2, (rec + 1) / 2
        psnr += (10 * torch.log10(1 / (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10))).tolist()
        B, C, T, H, W = a.shape
        frames = lambda v: v.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)  # (B*T, C, H, W)
        ssims += ssim(frames(a), frames(b)).view(B, T).mean(1).tolist()
        if shapes:
            for o, r in zip(prepare_data.to_uint8(x), prepare_data.to_uint8(rec)):
                ro, rr = prepare_data.read_clip(o), prepare_data.read_clip(r)
                valid_orig += ro['valid']
                same += ro['valid'] and ro == rr
    out = dict(clips=n, psnr=float(np.mean(psnr)), ssim=float(np.mean(ssims)), codebook_used=int(used.sum()),
               codebook_size=model.codebook_size, codebook_usage=float(used.float().mean()),
               seconds=round(time.time() - t0, 1), dtype=args.dtype)
    if shapes:
        out['reader_accuracy'] = same / max(valid_orig, 1)
    return out


def psnr(a, b):
    """PSNR in dB of float clips (B, C, T, H, W) in [0, 1], per clip."""
    return 10 * torch.log10(1 / (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10))


def ssim_clips(a, b):
    """Mean SSIM over the frames of float clips (B, C, T, H, W) in [0, 1], per clip."""
    B, C, T, H, W = a.shape
    frames = lambda v: v.float().transpose(1, 2).reshape(B * T, C, H, W)  # (B*T, C, H, W)
    return ssim(frames(a), frames(b)).view(B, T).mean(1)


def baselines(lo, scale: int, scale_t: int) -> dict:
    """The fixed upsamplings an upsampler must beat, of lo (B, 3, t, h, w): in time, repeating each given frame and
    the linear cross-fade between given frames; in space, bicubic (after the time one when both)."""
    out = {'repeat': lo.repeat_interleave(2, 2)[:, :, :-1], 'crossfade': superres.crossfade(lo)} if scale_t > 1 else {}
    if scale > 1:
        out = {k: superres.bicubic(v, scale).clamp(-1, 1) for k, v in (out or {'bicubic': lo}).items()}
    return out


@torch.no_grad()
def eval_upsampler(model, ckpt: dict, args) -> dict:
    """PSNR and SSIM of the upsampling of --n validation clips, area-downsampled (and every other frame kept, in
    time), against the clips, and of the fixed baselines; in time on the frames between the given ones only.
    On shapes data also the share of upsampled clips the reader reads as their original."""
    c, val = model.config, prepare_data.load_split(args.data, 'val')
    res, n = ckpt['data_key']['resolution'], min(args.n, len(val['clips']))
    scores, same, valid, t0 = {}, 0, 0, time.time()
    shapes = val['meta']['dataset'] == 'shapes'
    for i in range(0, n, args.batch_size):
        x, _ = prepare_data.get_batch(val, 0, res, idx=np.arange(i, min(n, i + args.batch_size)))
        x = x[:, :, :x.shape[2] - (x.shape[2] + 1) % 2] if c.scale_t > 1 else x  # an odd number of frames
        lo = F.avg_pool3d(x, (1, c.scale, c.scale)) if c.scale > 1 else x
        lo = lo[:, :, ::c.scale_t].to(args.device)
        with train.autocast(args.device, args.dtype):
            made = {'model': model.sample(None, lo, noise=args.sr_noise).float().cpu()}
        made.update({k: v.float().cpu() for k, v in baselines(lo.float(), c.scale, c.scale_t).items()})
        between = slice(1, None, 2) if c.scale_t > 1 else slice(None)  # the frames that were not given
        for name, v in made.items():
            a, b = (x[:, :, between] + 1) / 2, (v[:, :, between] + 1) / 2
            scores.setdefault(name, {'psnr': [], 'ssim': []})
            scores[name]['psnr'] += psnr(a, b).tolist()
            scores[name]['ssim'] += ssim_clips(a, b).tolist()
        if shapes:
            for o, r in zip(prepare_data.to_uint8(x), prepare_data.to_uint8(made['model'])):
                ro, rr = prepare_data.read_clip(o), prepare_data.read_clip(r)
                valid += ro['valid']
                same += ro['valid'] and ro == rr
    out = {name: {k: float(np.mean(v)) for k, v in s.items()} for name, s in scores.items()}
    out.update(clips=n, seconds=round(time.time() - t0, 1), dtype=args.dtype, sr_noise=args.sr_noise)
    if shapes:
        out['reader_accuracy'] = same / max(valid, 1)
    return out


def shapes_only(ckpt: dict) -> None:
    if ckpt['data_meta']['dataset'] != 'shapes':
        raise train.TrainError('caption accuracy needs a model trained on shapes data, whose videos can be read back')


@torch.no_grad()
def eval_generator(model, tok, ckpt: dict, args, settings: dict) -> dict:
    shapes_only(ckpt)
    meta = ckpt['data_meta']
    combos = [dict(zip(prepare_data.ATTRIBUTES, c)) for c in prepare_data.COMBOS]
    if args.n_prompts < len(combos):
        pick = np.random.default_rng(args.seed).choice(len(combos), args.n_prompts, replace=False)
        combos = [combos[i] for i in pick]
    rng = np.random.default_rng(args.seed)
    write = {'canonical': lambda a: prepare_data.caption(a),
             'held_out': lambda a: prepare_data.held_out_caption(a, rng),
             'train': lambda a: prepare_data.caption(a, rng, made_up=0.0)}[args.phrasing]
    prompts = [write(a) for a in combos for _ in range(args.samples_per_prompt)]
    if args.phrasing == 'held_out' and meta.get('flags', {}).get('holdout_phrasings') is False:
        print('warning: this model\'s training captions did not hold the held-out phrasings out '
              '(prepare_data.py --holdout_phrasings), so they are not new to it', file=sys.stderr)
    upsamplers = sample.load_upsamplers(args.superres, args.device)
    videos, big, g, t0 = [], [], torch.Generator(device=args.device).manual_seed(args.seed), time.time()
    g_sr = torch.Generator(device=args.device).manual_seed(args.seed)  # its own, so --sr_noise keeps the videos
    for i in range(0, len(prompts), args.batch_size):
        ids = sample.encode_prompts(prompts[i:i + args.batch_size], meta).to(args.device)
        with train.autocast(args.device, args.dtype):
            made = model.sample(ids, generator=g, **settings)
            made = train.to_clips(model.reads, tok, made)
            videos.append(prepare_data.to_uint8(made))
            if upsamplers:
                big.append(prepare_data.to_uint8(sample.upsample(made, upsamplers, g_sr, args.sr_noise)))
    videos = np.concatenate(videos)
    mistakes = collections.Counter()
    out = {'all_prompts': prepare_data.caption_accuracy(videos, prompts, mistakes)}
    if upsamplers:  # the same videos after the upsamplers, read at their new size
        out['superres'] = prepare_data.caption_accuracy(np.concatenate(big), prompts)

    def part(keep):  # the accuracy of the videos where keep is True
        return prepare_data.caption_accuracy(videos[keep], [p for p, k in zip(prompts, keep) if k])
    holdout = prepare_data.parse_holdout(meta.get('holdout', ''))
    if holdout:
        held = np.array([prepare_data.is_held_out(prepare_data.parse_caption(p), holdout) for p in prompts])
        out['seen'], out['held_out'] = part(~held), part(held)
    if args.phrasing == 'held_out':  # each wording apart, phrasing_1 ... in HELD_OUT_PHRASINGS's order
        which = np.array([prepare_data.held_out_phrasing(p) for p in prompts])
        for i in np.unique(which[which >= 0]):
            out[f'phrasing_{i + 1}'] = part(which == i)
    out['phrasing'] = args.phrasing
    out['mistakes'] = dict(mistakes.most_common(8))  # the commonest ways a video missed its caption, with counts
    out['seconds_per_video'] = (time.time() - t0) / len(prompts)
    return out


OPPOSITE = {'left': 'right', 'right': 'left', 'up': 'down', 'down': 'up'}


def room(frame: np.ndarray, motion: str) -> float:
    """The free canvas between the object in a uint8 (H, W, 3) frame and the edge it would move to, as a share
    of the side (0 when there is no object)."""
    ys, xs = np.nonzero(frame.max(-1) > 0.35 * 255)
    if len(xs) == 0:
        return 0.0
    S = frame.shape[0]
    free = {'left': xs.min(), 'right': S - 1 - xs.max(), 'up': ys.min(), 'down': S - 1 - ys.max()}[motion]
    return float(free) / S


@torch.no_grad()
def eval_story(model, tok, ckpt: dict, args, settings: dict) -> dict:
    """Two-prompt stories: one object whose motion changes from A's to another (any of the three others, right
    angles included; --story_motion opposite: the reverse only), made as sample.py --story "A|B" makes them,
    with the frames shared out between A and B in the same way. Each segment is judged on its own frames."""
    shapes_only(ckpt)
    t, ft = model.config.grid[0], sample.time_factor(tok)
    frames = args.story_frames
    if frames < 1 + 2 * ft or (frames - 1) % ft:
        raise train.TrainError(f'--story_frames must be 1 + {ft}k and at least {1 + 2 * ft}, got {frames}')
    if not 1 <= args.turn_context < t:
        raise train.TrainError(f'--turn_context must be between 1 and {t - 1} latent frames, got {args.turn_context}')
    ends, context = sample.story_split(2, frames, ft), (t + 1) // 2
    wraps = sample.wraps(ckpt['data_meta'])
    centre = wraps and not args.no_centre
    (a0, a1), (b0, b1) = sample.part_frames(ends, ft)
    rng = np.random.default_rng(args.seed)
    stories = []
    for _ in range(args.story):
        a = dict(zip(prepare_data.ATTRIBUTES, prepare_data.COMBOS[rng.integers(len(prepare_data.COMBOS))]))
        others = [m for m in prepare_data.MOTIONS if m != a['motion']]
        turn = OPPOSITE[a['motion']] if args.story_motion == 'opposite' else others[rng.integers(len(others))]
        stories.append((prepare_data.caption(a), prepare_data.caption(dict(a, motion=turn))))
    g, t0, seg_a, seg_b = torch.Generator(device=args.device).manual_seed(args.seed), time.time(), [], []
    for i in range(0, len(stories), args.batch_size):
        part = stories[i:i + args.batch_size]
        ids = [sample.encode_prompts([s[k] for s in part], ckpt['data_meta']).to(args.device) for k in (0, 1)]
        with train.autocast(args.device, args.dtype):
            videos = prepare_data.to_uint8(sample.sample_long(model, tok, ids, ends, context, generator=g,
                                                              turn_context=args.turn_context, centre=centre,
                                                              **settings))
        seg_a.append(videos[:, a0:a1])
        seg_b.append(videos[:, b0:b1])
    seg_a, seg_b, second = np.concatenate(seg_a), np.concatenate(seg_b), [s[1] for s in stories]
    reverse = np.array([prepare_data.parse_caption(b)['motion'] == OPPOSITE[prepare_data.parse_caption(a)['motion']]
                        for a, b in stories])
    # the reader needs 0.15 of the canvas of travel: where B starts closer to its edge, no video can be right,
    # unless the model's data wraps round the canvas (prepare_data.py --wrap): then every object has room
    free = np.array([wraps or room(v[-1], prepare_data.parse_caption(b)['motion']) >= 0.15
                     for v, b in zip(seg_a, second)])
    out = {'frames': frames, 'segment_frames': [[a0, a1], [b0, b1]], 'motion_change': args.story_motion,
           'centre': centre,
           'segment_1': prepare_data.caption_accuracy(seg_a, [s[0] for s in stories]),
           'segment_2': prepare_data.caption_accuracy(seg_b, second)}
    parts = (('reverse', reverse), ('right_angle', ~reverse)) if args.story_motion == 'any' else ()
    for name, keep in (*parts, ('with_room', free), ('without_room', ~free)):  # the second segment, apart
        if keep.any():
            out[f'segment_2_{name}'] = prepare_data.caption_accuracy(seg_b[keep], [s for s, k in zip(second, keep) if k])
    out['seconds_per_video'] = (time.time() - t0) / len(stories)
    return out


@torch.no_grad()
def eval_given(model, tok, ckpt: dict, args, settings: dict) -> dict:
    """Image to video (--given first) or interpolation (--given ends) on validation clips, with their captions."""
    if args.given == 'ends' and model.reads == 'codes':
        raise train.TrainError('--given ends (interpolation) needs a diffusion model; a prior continues from the '
                               'first frames only (--given first)')
    val = prepare_data.load_split(args.data, 'val')
    res, n = ckpt['data_key']['resolution'], min(args.n, len(val['clips']))
    ft = sample.time_factor(tok)
    given_psnr, decoded_psnr, mid, fade, videos, prompts, t0 = [], [], [], [], [], [], time.time()
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    for i in range(0, n, args.batch_size):
        idx = np.arange(i, min(n, i + args.batch_size))
        x, ids = prepare_data.get_batch(val, 0, res, idx=idx)
        x, ids = x.to(args.device), ids.to(args.device)
        with train.autocast(args.device, args.dtype):
            z = train.from_clips(model.reads, tok, x)  # (B, t, h, w) codes, or (B, C, t, h, w)
            first = z[..., :1, :, :]
            kw = dict(last=z[..., -1:, :, :]) if args.given == 'ends' else {}
            decoded = train.to_clips(model.reads, tok, model.sample(ids, x=first, generator=g, **kw, **settings))
        made = sample.put_back(decoded.float(), x[:, :, :1], x[:, :, -1:] if args.given == 'ends' else None)
        a, b = (x + 1) / 2, (made + 1) / 2
        given_psnr += psnr(a[:, :, :1], b[:, :, :1]).tolist()
        decoded_psnr += psnr(a[:, :, :1], (decoded[:, :, :1].float() + 1) / 2).tolist()
        if args.given == 'ends':
            T = x.shape[2]
            between = slice(1, T - ft)  # the frames that the first and last latent frames do not hold
            w = torch.linspace(0, 1, T, device=x.device).view(1, 1, T, 1, 1)
            crossfade = (1 - w) * a[:, :, :1] + w * a[:, :, -1:]
            given_psnr += psnr(a[:, :, -1:], b[:, :, -1:]).tolist()
            mid += psnr(a[:, :, between], b[:, :, between]).tolist()
            fade += psnr(a[:, :, between], crossfade[:, :, between]).tolist()
        videos.append(prepare_data.to_uint8(made))
        prompts += [val['captions'][j] for j in idx]
    out = dict(given=args.given, clips=n, given_frames_psnr=float(np.mean(given_psnr)),
               decoded_first_frame_psnr=float(np.mean(decoded_psnr)))  # before sample.put_back: the seam
    if args.given == 'ends':
        out.update(between_psnr=float(np.mean(mid)), crossfade_psnr=float(np.mean(fade)))
    if val['meta']['dataset'] == 'shapes':
        out['captions'] = prepare_data.caption_accuracy(np.concatenate(videos), prompts)
    out['seconds_per_video'] = (time.time() - t0) / n
    return out


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', required=True, help='checkpoint written by train.py')
    p.add_argument('--data', default=None, help='codec: dataset directory (default: the one the model was trained on)')
    p.add_argument('--n', type=int, default=512, help='codec, upsampler, --given: validation clips to measure')
    p.add_argument('--batch_size', type=int, default=32, help='clips per forward pass')
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    p.add_argument('--n_prompts', type=int, default=192, help='generator: shapes captions to prompt with (a random '
                   'subset below 192)')
    p.add_argument('--samples_per_prompt', type=int, default=2, help='generator: videos per caption')
    p.add_argument('--seed', type=int, default=0, help='generator: sampling seed')
    p.add_argument('--story', type=int, default=0, help='generator: measure this many two-prompt stories instead')
    p.add_argument('--story_frames', type=int, default=65, help='generator: frames of each story video')
    p.add_argument('--story_motion', choices=['any', 'opposite'], default='any', help="generator: the story's "
                   'second motion: any of the three others (right angles included) or the opposite one')
    p.add_argument('--phrasing', choices=['canonical', 'held_out', 'train'], default='canonical',
                   help='generator: prompts in the canonical caption, in held-out phrasings that no training '
                        'caption uses (prepare_data.py --holdout_phrasings), or in the training grammar')
    p.add_argument('--turn_context', type=int, default=1, help='generator: latent frames kept where the prompt '
                   'changes (as sample.py --turn_context)')
    p.add_argument('--no_centre', action='store_true', help='generator: on data that wraps round the canvas, do '
                   'not roll each window to put the object in the middle (as sample.py --no_centre)')
    p.add_argument('--given', choices=['first', 'ends'], default=None, help='generator: give it the first frame '
                   '(image to video) or the first and last (interpolation, diffusion) of --n validation clips')
    p.add_argument('--superres', action='append', default=[], help='generator: also measure its videos after this '
                   'upsampler (repeatable, as sample.py --superres)')
    p.add_argument('--sr_noise', type=float, default=0.0, help='upsampler: the noise level of its input (as '
                   'sample.py --sr_noise)')
    sample.add_device_flags(p)
    sample.add_sampling_flags(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    for name in ('n', 'batch_size', 'n_prompts', 'samples_per_prompt'):
        if getattr(args, name) < 1:
            print(f'eval.py: error: --{name} must be at least 1, got {getattr(args, name)}', file=sys.stderr)
            return 2
    args.device = train.auto_device(args.device)
    args.dtype = train.auto_dtype(args.dtype, args.device)
    train.flush_denormals(args.device)
    try:
        ckpt = train.read_checkpoint(args.ckpt, 'train one with python train.py (see README.md)')
        model = train.load_model(ckpt, args.device)
        args.data = args.data or ckpt['args']['data']
        if model.kind == 'codec':
            out = eval_codec(model, ckpt, args)
        elif model.kind == 'upsampler':
            out = eval_upsampler(model, ckpt, args)
        else:
            settings = model.settings(**{k: getattr(args, k, None) for k in sample.SETTINGS})
            tok = sample.tokenizer_of(model, ckpt, args.device)
            run = eval_given if args.given else eval_story if args.story else eval_generator
            out = run(model, tok, ckpt, args, settings)
            out['settings'] = dict(settings, seed=args.seed, dtype=args.dtype)
    except (train.TrainError, sample.SampleError, FileNotFoundError, ValueError) as e:
        print(f'eval.py: error: {e}', file=sys.stderr)
        return 2
    fmt = lambda d: ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in d.items())
    indent = ''
    if model.kind != 'generator':
        print(f"{ckpt['model_type']} {args.ckpt} on {args.data} val:")
        indent = '  '
    for k, v in out.items():
        print(f'{indent}{k}: ' + (fmt(v) if isinstance(v, dict) else f'{v:.4g}' if isinstance(v, float) else f'{v}'))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
