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
(the best of a large matmul and a large 3D convolution); ms/step is the median of --iters steps, then its
phases' medians (forward, backward, each optimizer's step: where a step's time goes). An ar prior's
step is timed in turn with a plain nanoGPT-style GPT of its size (PlainGPT, --no-baseline to skip it), and the
ratio of their speeds is printed: the figure every speed claim about the prior rests on (RESULTS.md). With
--sample it times the model's sample() on the batch with sample.py's settings flags (guidance doubles the
batch of each pass; --cfg 1 runs it alone).
"""
import argparse
import dataclasses
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import prior
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


class PlainGPT(nn.Module):
    """The yardstick of the ar prior's speed: a plain nanoGPT-style causal transformer of the prior's size
    (n_layer pre-norm blocks of n_embd in n_head heads, SDPA, exact GELU), with learned absolute positions
    over [text ; video] and nothing else: no rotary or factorised positions, no text layers, no caption
    dropout. It takes the prior's batch and computes the prior's loss: the cross-entropy of each video token
    from the text and the tokens before it. Its optimizers follow the prior's rule (Muon for the blocks'
    matrices when the config says muon, AdamW for the rest), so a ratio compares the networks alone."""

    def __init__(self, c):
        super().__init__()
        self.config, self.n_head = c, c.n_head
        self.text_emb, self.tok_emb = nn.Embedding(c.text_vocab, c.n_embd), nn.Embedding(c.vocab_size, c.n_embd)
        self.pos = nn.Embedding(c.text_len + math.prod(c.grid), c.n_embd)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(c.n_embd), qkv=nn.Linear(c.n_embd, 3 * c.n_embd), proj=nn.Linear(c.n_embd, c.n_embd),
            ln2=nn.LayerNorm(c.n_embd), fc=nn.Linear(c.n_embd, 4 * c.n_embd), out=nn.Linear(4 * c.n_embd, c.n_embd)))
            for _ in range(c.n_layer))
        self.ln_f, self.head = nn.LayerNorm(c.n_embd), nn.Linear(c.n_embd, c.vocab_size, bias=False)
        for n, p in self.named_parameters():  # nanoGPT's initialisation, the residual projections scaled down
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * c.n_layer) if n.endswith(('proj.weight', 'out.weight')) else 0.02
                nn.init.normal_(p, std=std)
            elif n.endswith('bias'):
                nn.init.zeros_(p)

    def forward(self, x, text):
        B, L = text.shape
        video = x.reshape(B, -1)  # (B, N)
        h = torch.cat([self.text_emb(text), self.tok_emb(video[:, :-1])], 1)
        h = h + self.pos.weight[:h.shape[1]]  # (B, S, C), S = L + N - 1
        S, C = h.shape[1:]
        for b in self.blocks:
            q, k, v = b.qkv(b.ln1(h)).view(B, S, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + b.proj(y.transpose(1, 2).reshape(B, S, C))
            h = h + b.out(F.gelu(b.fc(b.ln2(h))))
        logits = self.head(self.ln_f(h[:, L - 1:]))  # (B, N, V)
        return logits, F.cross_entropy(logits.float().flatten(0, 1), video.flatten())

    def configure_optimizers(self, device_type: str) -> list:
        c = self.config
        named = list(self.named_parameters())
        hidden = [p for n, p in named if c.optimizer == 'muon' and p.dim() == 2 and n.startswith('blocks.')]
        rest = [p for n, p in named if all(p is not q for q in hidden)]
        groups = [{'params': [p for p in rest if p.dim() >= 2], 'weight_decay': c.weight_decay},
                  {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0}]
        adamw = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, fused=device_type in ('cuda', 'cpu'))
        if not hidden:
            return [adamw]
        return [adamw, prior.Muon(hidden, lr=c.lr, weight_decay=c.weight_decay)]


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
    p.add_argument('--baseline', action=argparse.BooleanOptionalAction, default=None,
                   help='an ar prior: also time a plain GPT of the same size, in turn with it, and print the ratio '
                        '(default: on for an ar prior\'s training step)')
    train.add_config_flags(p, cfg_cls)
    sample.add_sampling_flags(p)
    args = p.parse_args(argv)
    args.device = train.auto_device(args.device)
    train.flush_denormals(args.device)  # as train.py does
    config = cfg_cls(**train.config_overrides(args, cfg_cls))
    if getattr(config, 'in_channels', None) == 0:  # diffusion's data sizes, as train.py sets them on shapes
        latent, res = config.space == 'latent', config.resolution or 32
        config = dataclasses.replace(config, in_channels=4 if latent else 3,
                                     grid=config.grid or ((5, res // 4, res // 4) if latent else (args.frames, res, res)))
    ar = args.model == 'prior' and config.mode == 'ar'
    if args.baseline and (not ar or args.sample):
        p.error('--baseline times the training step of an ar prior (--model=prior --mode=ar, no --sample)')
    args.baseline = ar and not args.sample if args.baseline is None else args.baseline
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
    model = train.to_device(train.MODELS[args.model][1](config), args.device)
    x, ids = fake_batch(model, config, args)
    ctx = train.autocast(args.device, args.dtype)
    threads = f'{torch.get_num_threads()} threads' if args.device == 'cpu' else args.device
    if args.sample:
        return bench_sample(model, x, ids, ctx, args, threads)
    flops = step_flops(model, x, ids, ctx)
    runs = {args.model: model}
    if args.baseline:
        torch.manual_seed(0)
        runs['baseline'] = PlainGPT(config).to(args.device)
    times = time_steps(runs, lambda: fake_batch(model, config, args), ctx, args)
    dt, peak, B = times[args.model]['step'], measured_peak(args.dtype, args.device, args.peak_seconds), x.shape[0]
    tokens = f', {B * (ids.shape[1] + x[0].numel()) / dt:.0f} tokens/s' if model.reads == 'codes' else ''
    print(f'{args.model} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, batch {B} x '
          f'{tuple(x.shape[1:])}, {args.dtype}, compile {args.compile}, optimizer {config.optimizer}, {threads}')
    print(f'{dt * 1000:.1f} ms/step (median of {args.iters}), {B / dt:.1f} clips/s{tokens}, {flops / dt / 1e9:.1f} '
          f'GFLOP/s model, measured peak {peak / 1e9:.0f} GFLOP/s, MFU {flops / dt / peak * 100:.1f}%')
    phases = {p: t * 1000 for p, t in times[args.model].items() if p != 'step'}
    print('median ms of its phases: ' + ', '.join(f'{p} {t:.1f}' for p, t in phases.items()))
    result = dict(ms=dt * 1000, clips_per_s=B / dt, flops=flops, mfu=flops / dt / peak, phases_ms=phases)
    if args.baseline:
        base = times['baseline']['step']
        print(f'baseline, a plain GPT of the same size: {base * 1000:.1f} ms/step, '
              f'{B * (ids.shape[1] + x[0].numel()) / base:.0f} tokens/s; the prior is {base / dt:.2f}x its speed')
        result.update(baseline_ms=base * 1000, ratio=base / dt)
    return result


def step_flops(model, x, ids, ctx) -> int:
    """Forward + backward FLOPs of one training step, counted eager."""
    with FlopCounterMode(display=False) as fc:
        with ctx:
            model(x, ids)[1].backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def time_steps(runs: dict, batch, ctx, args) -> dict:
    """{name: {phase: median seconds}} of a training step of each model in runs: 'step' the whole, and its
    phases 'forward', 'backward' and each optimizer's step (by class name). The models' steps are taken in
    turn, so that a machine that slows down or speeds up weighs on all of them alike, each step on a new
    batch() that all of them share: repeating one batch lets a model memorise it, and on Intel CPUs the
    memorised float32 prior's backward then slowed 3x with denormal numbers (RESULTS.md)."""
    steps, times = {}, {name: [] for name in runs}
    for name, m in runs.items():
        optimizers = m.configure_optimizers(args.device.split(':')[0])
        compiled = torch.compile(m) if args.compile else m

        def step(x, ids, compiled=compiled, optimizers=optimizers):
            clock = [time.perf_counter()]
            def lap():
                synchronize(args.device)
                clock.append(time.perf_counter())
            with ctx:
                loss = compiled(x, ids)[1]
            lap()
            loss.backward()
            lap()
            for o in optimizers:
                o.step()
                o.zero_grad(set_to_none=True)
                lap()
            phases = ['forward', 'backward', *(type(o).__name__ for o in optimizers)]
            return {'step': clock[-1] - clock[0], **{p: t1 - t0 for p, t0, t1 in zip(phases, clock, clock[1:])}}
        steps[name] = step
    for i in range(args.warmup + args.iters):
        x, ids = batch()
        for name, step in steps.items():
            synchronize(args.device)
            t = step(x, ids)
            if i >= args.warmup:
                times[name].append(t)
    return {name: {p: statistics.median(t[p] for t in ts) for p in ts[0]} for name, ts in times.items()}


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
