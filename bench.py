"""
Time one model's training step (forward + backward + AdamW, or --optimizer muon), in the spirit of nanoGPT's bench.py.

    python bench.py --model=tokenizer --batch_size 4 --dtype float32
    python bench.py --model=tokenizer --batch_size 4 --dtype bfloat16 --compile
    python bench.py --model=prior --mode=ar --batch_size 8 --dtype bfloat16
    python bench.py --model=prior --mode=ar --batch_size 4 --sample    # generation speed instead
    python bench.py --model=prior --mode=ar --batch_size 4 --sample --cfg 1    # ... without guidance

Prints ms/step, clips/s and tokens/s (every token through the transformer, the masked prior's first frames
trained again as images included), the model FLOPs counted by torch's FlopCounterMode, and the
model-FLOPs utilisation (MFU) against this machine's measured peak (the best of a large matmul and a
large 3D convolution) in the same dtype. With --sample it times prior.generate on a batch of clips
(with the mode's guidance, so each step runs a doubled batch; --cfg 1 runs the batch alone, like
nanoGPT's generate) and, for ar, the same tokens made without the KV cache (every step recomputes the
whole sequence, like nanoGPT's generate).
"""
import argparse
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

import prior
import train


def measured_peak(dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """The best FLOP/s of a large matmul and of a large 3x3x3 convolution in this dtype: the ceiling MFU is
    measured against (on CPUs oneDNN's convolutions can beat the BLAS matmul, so both are tried)."""
    a, b = torch.randn(2048, 2048, device=device, dtype=dtype), torch.randn(2048, 2048, device=device, dtype=dtype)
    x = torch.randn(4, 64, 17, 16, 16, device=device, dtype=dtype).to(memory_format=torch.channels_last_3d)
    w = torch.randn(64, 64, 3, 3, 3, device=device, dtype=dtype).to(memory_format=torch.channels_last_3d)
    kernels = [(lambda: a @ b, 2 * 2048 ** 3),
               (lambda: torch.nn.functional.conv3d(x, w, padding=1), 2 * 4 * 64 * 64 * 17 * 16 * 16 * 27)]
    best = 0.0
    for fn, flops in kernels:
        fn()
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 2:
            fn()
            k += 1
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        best = max(best, flops * k / (time.perf_counter() - t0))
    return best


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--model', default='tokenizer', choices=list(train.MODELS))
    name = pre.parse_known_args(argv)[0].model
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument('--model', default='tokenizer', choices=list(train.MODELS), help='which model to time')
    p.add_argument('--batch_size', type=int, default=4, help='clips per step')
    p.add_argument('--frames', type=int, default=17, help='frames per clip')
    p.add_argument('--resolution', type=int, default=32, help='square frame size')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'], help='autocast dtype')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the model')
    p.add_argument('--device', default='cpu', help='cpu, cuda, ...')
    p.add_argument('--steps', type=int, default=10, help='timed steps')
    p.add_argument('--optimizer', default='adamw', choices=['adamw', 'muon'], help='muon: as train.py (prior only)')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first (compilation happens here)')
    cfg_cls, model_cls = train.MODELS[name]
    train.add_config_flags(p, cfg_cls)
    p.add_argument('--sample', action='store_true', help='prior: time generation (KV cache or mask steps), not training')
    p.add_argument('--uncached', action=argparse.BooleanOptionalAction, default=True,
                   help='--sample with ar: also time generation without the KV cache')
    p.add_argument('--cfg', type=float, default=None,
                   help="--sample: guidance scale (default: the mode's); 1 skips the unconditional pass")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = cfg_cls(**train.config_overrides(args, cfg_cls))
    model = model_cls(config).to(args.device)
    device_type = 'cuda' if args.device.startswith('cuda') else args.device
    if device_type == 'cpu':
        model = model.to(memory_format=torch.channels_last_3d)
    if args.optimizer == 'muon' and name != 'prior':
        p.error('--optimizer muon is for the prior')
    muon = {'muon': True} if args.optimizer == 'muon' else {}
    optimizer = train.Optimizers(model.configure_optimizers(0.0, 1e-4, (0.9, 0.99), device_type, **muon))
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.dtype]
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    if name == 'prior':  # codes and caption ids of the model's own sizes
        x = torch.randint(config.vocab_size, (args.batch_size, *config.grid), device=args.device)
        ids = torch.randint(config.text_vocab, (args.batch_size, config.text_len), device=args.device)
    else:
        x = torch.rand(args.batch_size, 3, args.frames, args.resolution, args.resolution, device=args.device) * 2 - 1
        ids = torch.zeros(args.batch_size, 1, dtype=torch.long, device=args.device)
    if args.sample:
        if name != 'prior':
            p.error('--sample times a prior; use --model=prior')
        return bench_sample(model, ids, ctx, args)
    step_model = torch.compile(model) if args.compile else model

    def step():
        with ctx:
            loss = train.loss_of(step_model, name, x, ids, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:  # forward + backward FLOPs of one step, eager
        with ctx:
            loss = train.loss_of(model, name, x, ids, None)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    for _ in range(args.warmup):
        step()
    if device_type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device_type == 'cuda':
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = measured_peak(dtype, args.device)
    tokens = tokens_per_clip(model, name, x)
    n_params = sum(p.numel() for p in model.parameters())
    print(f'{name} {n_params / 1e6:.2f}M params, batch {args.batch_size}x{args.frames}x{args.resolution}x{args.resolution}, '
          f'{args.dtype}, compile {args.compile}, {torch.get_num_threads()} threads')
    print(f'{dt * 1000:.1f} ms/step, {args.batch_size / dt:.1f} clips/s, {args.batch_size * tokens / dt:.0f} tokens/s '
          f'({tokens} tokens/clip), {flops / dt / 1e9:.1f} GFLOP/s model, measured peak {peak / 1e9:.0f} GFLOP/s, '
          f'MFU {flops / dt / peak * 100:.1f}%')
    return dict(ms=dt * 1000, clips_per_s=args.batch_size / dt, flops=flops, mfu=flops / dt / peak)


@torch.no_grad()
def uncached_ar(model, text, cfg: float):
    """Greedy AR sampling that recomputes the whole sequence for every token: the baseline for the KV cache
    (guided, like prior.generate's default, on the first latent frame only)."""
    text2 = text if cfg == 1.0 else torch.cat([text, torch.full_like(text, model.config.pad_id)])
    video = torch.zeros(text.shape[0], 0, dtype=torch.long, device=text.device)
    h, w = model.config.grid[1:]
    for i in range(model.n_video):
        if i == prior.SAMPLING['ar']['guide_frames'] * h * w:
            text2, cfg = text, 1.0
        x = model.transformer(model.embed(text2, video.repeat(text2.shape[0] // text.shape[0], 1)), causal=True)
        logits = model.guided(model.head(model.ln_f(x[:, -1])), cfg)
        video = torch.cat([video, logits.argmax(-1, keepdim=True)], 1)
    return video


def bench_sample(model, ids, ctx, args) -> dict:
    model.eval()
    n, mode = ids.shape[0] * model.n_video, model.config.mode

    def timed(fn):
        t0 = time.perf_counter()
        with ctx:
            fn()
        return time.perf_counter() - t0

    cfg = prior.SAMPLING[mode]['cfg'] if args.cfg is None else args.cfg
    timed(lambda: model.generate(ids[:1], cfg=cfg, steps=2))  # warm up
    dt = min(timed(lambda: model.generate(ids, cfg=cfg, steps=12)) for _ in range(3))  # best of 3: the machine is noisy
    how = 'KV cache' if mode == 'ar' else '12 parallel steps (12 forward passes)'
    print(f'prior {mode} sampling, {args.dtype}, batch {ids.shape[0]}, {model.n_video} video tokens per clip, '
          f'guidance {cfg:g}{" (off: no unconditional pass)" if cfg == 1 else ""}, {torch.get_num_threads()} threads')
    print(f'{how}: {dt:.2f} s, {dt / ids.shape[0]:.2f} s per clip, {n / dt:.0f} tokens/s')
    out = dict(seconds=dt, tokens_per_s=n / dt)
    if mode == 'ar' and args.uncached:
        du = timed(lambda: uncached_ar(model, ids, cfg))
        print(f'without the cache: {du:.2f} s, {n / du:.0f} tokens/s; the cache is {du / dt:.1f}x faster')
        out['uncached_tokens_per_s'] = n / du
    return out


def tokens_per_clip(model, name, x) -> int:
    if name == 'tokenizer':
        ft, fs = model.config.factors
        return (1 + (x.shape[2] - 1) // ft) * (x.shape[3] // fs) * (x.shape[4] // fs)
    if name == 'prior':  # text + video tokens through the transformer, and a mask prior's share of image sequences
        c, B = model.config, x.shape[0]
        images = round(c.image_share * B) / B if c.mode == 'mask' and c.grid[0] > 1 else 0
        return round(c.text_len + model.n_video + images * (c.text_len + c.grid[1] * c.grid[2]))
    raise AssertionError(name)


if __name__ == '__main__':
    main()
