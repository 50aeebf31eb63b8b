"""
Time one model's training step (forward + backward + its optimizers), in the spirit of nanoGPT's bench.py.

    python bench.py --model=tokenizer --batch_size 4 --dtype float32
    python bench.py --model=tokenizer --batch_size 4 --dtype bfloat16 --compile
    python bench.py --model=prior --mode=ar --n_layer 6 --n_embd 256 --n_head 8 --grid 4,8,8 --text_len 32
    python bench.py --model=prior --mode=ar --batch_size 4 --sample                # sampling speed instead
    python bench.py --model=prior --mode=ar --batch_size 4 --sample --no-kv_cache  # ... recomputing every token

The model is built from its config flags (named like train.py's, the same defaults, so the optimizer is the
model's recipe: --optimizer adamw to time AdamW alone) and fed random data of its own sizes. Prints ms/step,
clips/s, tokens/s for a model of codes (each clip's text and video tokens), the model FLOPs counted by torch's
FlopCounterMode, and the model-FLOPs utilisation (MFU) against this machine's measured peak in the same dtype
(the best of a large matmul and a large 3D convolution). With --sample it times the model's sample() on the
batch with sample.py's settings flags (guidance doubles the batch of each pass; --cfg 1 runs it alone).
"""
import argparse
import dataclasses
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import sample
import train


def measured_peak(dtype: str, device: str, seconds: float) -> float:
    """The best FLOP/s of a large matmul and of a large 3x3x3 convolution in this dtype: the ceiling MFU is
    measured against (on CPUs oneDNN's convolutions can beat the BLAS matmul, so both are tried)."""
    dt = getattr(torch, dtype)
    a, b = torch.randn(2048, 2048, device=device, dtype=dt), torch.randn(2048, 2048, device=device, dtype=dt)
    x = torch.randn(4, 64, 17, 16, 16, device=device, dtype=dt).to(memory_format=torch.channels_last_3d)
    w = torch.randn(64, 64, 3, 3, 3, device=device, dtype=dt).to(memory_format=torch.channels_last_3d)
    kernels = [(lambda: a @ b, 2 * 2048 ** 3),
               (lambda: torch.nn.functional.conv3d(x, w, padding=1), 2 * 4 * 64 * 64 * 17 * 16 * 16 * 27)]
    best = 0.0
    for fn, flops in kernels:
        fn()
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 2:
            fn()
            k += 1
        synchronize(device)
        best = max(best, flops * k / (time.perf_counter() - t0))
    return best


def synchronize(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def get_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--model', default='tokenizer', choices=list(train.MODELS))
    cfg_cls = train.MODELS[pre.parse_known_args(argv)[0].model][0]
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='tokenizer', choices=list(train.MODELS), help='which model to time')
    p.add_argument('--frames', type=int, default=17, help='a model of pixels: frames per clip')
    p.add_argument('--device', default='auto', help='auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'], help='autocast dtype')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the model')
    p.add_argument('--iters', type=int, default=10, help='timed training steps')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first (compilation happens here)')
    p.add_argument('--peak_seconds', type=float, default=1.0, help="time spent measuring the machine's peak FLOP/s")
    p.add_argument('--sample', action='store_true', help='time sampling (a generator), not training')
    train.add_config_flags(p, cfg_cls)
    sample.add_sampling_flags(p)
    args = p.parse_args(argv)
    args.device = train.auto_device(args.device)
    config = cfg_cls(**train.config_overrides(args, cfg_cls))
    if getattr(config, 'in_channels', None) == 0:  # diffusion's data sizes, as train.py sets them on shapes
        latent, res = config.space == 'latent', config.resolution or 32
        config = dataclasses.replace(config, in_channels=4 if latent else 3,
                                     grid=config.grid or ((5, res // 4, res // 4) if latent else (args.frames, res, res)))
    return args, config


def fake_batch(model, config, args):
    """Random inputs of the model's sizes: codes of its grid, or clips; and caption ids of its text length."""
    B = config.batch_size
    if model.reads == 'codes':
        x = torch.randint(config.vocab_size, (B, *config.grid), device=args.device)
    elif model.reads == 'latents':
        x = torch.randn(B, config.in_channels, *config.grid, device=args.device)
    else:
        res = config.resolution or 64  # 0 is the data's size; shapes' is 64
        x = torch.rand(B, 3, args.frames, res, res, device=args.device) * 2 - 1
    ids = torch.randint(getattr(config, 'text_vocab', 1), (B, getattr(config, 'text_len', 1)), device=args.device)
    return x, ids


def main(argv=None) -> dict:
    args, config = get_args(argv)
    torch.manual_seed(0)
    model = train.MODELS[args.model][1](config).to(args.device)
    if args.device == 'cpu':
        model = model.to(memory_format=torch.channels_last_3d)
    x, ids = fake_batch(model, config, args)
    ctx = train.autocast(args.device, args.dtype)
    threads = f'{torch.get_num_threads()} threads' if args.device == 'cpu' else args.device
    if args.sample:
        return bench_sample(model, x, ids, ctx, args, threads)
    optimizers = model.configure_optimizers(args.device.split(':')[0])
    step_model = torch.compile(model) if args.compile else model

    def step(m):
        with ctx:
            loss = m(x, ids)[1]
        loss.backward()
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:  # forward + backward FLOPs of one step, eager
        with ctx:
            model(x, ids)[1].backward()
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step(step_model)
    synchronize(args.device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step(step_model)
    synchronize(args.device)
    dt = (time.perf_counter() - t0) / args.iters
    flops, peak, B = fc.get_total_flops(), measured_peak(args.dtype, args.device, args.peak_seconds), x.shape[0]
    tokens = f', {B * (ids.shape[1] + x[0].numel()) / dt:.0f} tokens/s' if model.reads == 'codes' else ''
    print(f'{args.model} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, batch {B} x '
          f'{tuple(x.shape[1:])}, {args.dtype}, compile {args.compile}, optimizer {config.optimizer}, {threads}')
    print(f'{dt * 1000:.1f} ms/step, {B / dt:.1f} clips/s{tokens}, {flops / dt / 1e9:.1f} GFLOP/s model, '
          f'measured peak {peak / 1e9:.0f} GFLOP/s, MFU {flops / dt / peak * 100:.1f}%')
    return dict(ms=dt * 1000, clips_per_s=B / dt, flops=flops, mfu=flops / dt / peak)


def bench_sample(model, x, ids, ctx, args, threads: str) -> dict:
    """Time sample(): a generator's from the caption ids (with sample.py's settings), or an upsampler's of the
    clips made smaller by its factors (a video of --frames frames at resolution / scale, in time every other)."""
    if model.kind == 'codec':
        raise SystemExit(f'bench.py: error: --sample times a generator or an upsampler; a {args.model} is a codec')
    model.eval()
    if model.kind == 'generator':
        settings = model.settings(**{k: getattr(args, k, None) for k in sample.SETTINGS})
        run = lambda B: model.sample(ids[:B], **settings)
        unit, n = 'tokens', x[0].numel()
    else:
        s, settings = model.config.scale, {}
        lo = torch.nn.functional.avg_pool3d(x, (1, s, s))[:, :, ::model.config.scale_t]
        run = lambda B: model.sample(None, lo[:B])
        unit, n = 'output pixels', x[0, 0].numel()

    def timed(B):
        t0 = time.perf_counter()
        with ctx:
            run(B)
        synchronize(args.device)
        return time.perf_counter() - t0

    timed(1)  # warm up
    B = x.shape[0]
    dt = min(timed(B) for _ in range(3))  # best of 3: the machine is noisy
    print(f'{args.model} sampling, {args.dtype}, batch {B}, {n} {unit} per clip, settings {settings}, {threads}')
    print(f'{dt:.3f} s, {dt / B:.3f} s per clip, {B * n / dt:.0f} {unit}/s')
    return dict(seconds=dt, seconds_per_clip=dt / B, per_s=B * n / dt)


if __name__ == '__main__':
    main()
