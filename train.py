"""
One training loop for every model, nanoGPT style.

    python train.py --model=tokenizer                                # single process, CPU or GPU
    torchrun --standalone --nproc_per_node=2 train.py --model=tokenizer   # DDP (Gloo on CPU, NCCL on GPU)

Flags named like a model's config fields (`--channels`, `--levels 8,5,5,5`) set that field; run
`python train.py --model=tokenizer --help` for the list. Every step's randomness is a function of
(seed, rank, step), so `--resume` continues exactly where a run stopped.
"""
import argparse
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext

import imageio.v3 as iio
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare_data
import prior as prior_lib
import tokenizer as tokenizer_lib

MODELS = {  # --model -> (config class, model class)
    'tokenizer': (tokenizer_lib.TokenizerConfig, tokenizer_lib.Tokenizer),
    'prior': (prior_lib.PriorConfig, prior_lib.Prior),
}
DEFAULTS = {  # per-model defaults of the training flags: the small CPU run
    'tokenizer': dict(batch_size=8, lr=1e-3, max_iters=4000, warmup_iters=100, weight_decay=0.0, eval_interval=500, ema=0.0,
                      optimizer='adamw'),
    # both priors: Muon, a high lr and a short EMA copy (sampled from) fit them in 2500 steps. On the pipeline
    # the masked prior's all-four went 0.479 -> 0.974 with Muon and image training (4500 steps); in 2500 steps at
    # lr 6e-3 an EMA of 0.99 scored 0.927 against 0.906 raw and 0.776 with 0.998, which lags so short a run; ar
    # scored 0.974 (1 % invalid) against 0.910 (5.1 %) for 4000 AdamW steps at 2e-3 (eval.py; RESULTS.md)
    'prior': dict(batch_size=8, lr=6e-3, max_iters=2500, warmup_iters=100, weight_decay=0.1, eval_interval=500, ema=0.99,
                  optimizer='muon'),
}
DERIVED = {  # config fields that follow from the data and the tokenizer, not from flags
    'prior': ('vocab_size', 'text_vocab', 'text_len', 'pad_id', 'grid'),
}


class TrainError(Exception):
    """A bad flag, checkpoint or dataset: printed as one line, exit code 2."""


class Optimizers:
    """One optimizer, or several over disjoint parameters (AdamW + Muon), stepped, saved and loaded as one. The
    state dict of a single optimizer is its own, so checkpoints of AdamW runs load as before."""
    def __init__(self, optimizers):
        self.optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]

    @property
    def param_groups(self):  # read each time: load_state_dict replaces an optimizer's groups
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        states = [o.state_dict() for o in self.optimizers]
        return states[0] if len(states) == 1 else {'optimizers': states}

    def load_state_dict(self, state):
        states = state['optimizers'] if len(self.optimizers) > 1 else [state]
        for o, s in zip(self.optimizers, states, strict=True):
            o.load_state_dict(s)


# -----------------------------------------------------------------------------
# flags

def field_help(cls) -> dict[str, str]:
    """The trailing comment of each dataclass field, used as its --help."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r'\s+(\w+): [^=]+=.*?#\s*(.*)$', line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


def parse_tuple(kind):
    def parse(text):
        try:
            return tuple(kind(v) for v in text.split(',') if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got '{text}'") from None
    return parse


def add_config_flags(p: argparse.ArgumentParser, cfg_cls, skip=()) -> None:
    """A flag per config field, named like it; default None means 'the config default'."""
    g = p.add_argument_group(f'{cfg_cls.__name__} fields (default: the config default)')
    helps = field_help(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        if f.name in skip:
            continue
        kind, default = type(f.default), f.default
        kw = dict(default=None, help=f'{helps.get(f.name, f.name)} (default {default})')
        if kind is bool:
            g.add_argument(f'--{f.name}', action=argparse.BooleanOptionalAction, **kw)
        elif kind is tuple:
            g.add_argument(f'--{f.name}', type=parse_tuple(type(default[0])), **kw)
        else:
            g.add_argument(f'--{f.name}', type=kind, **kw)


def config_overrides(args, cfg_cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg_cls) if getattr(args, f.name, None) is not None}


def get_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--model', default='tokenizer', choices=list(MODELS))
    model_name = pre.parse_known_args(argv)[0].model
    d = DEFAULTS[model_name]
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument('--model', default='tokenizer', choices=list(MODELS), help='which model to train')
    p.add_argument('--data', default='data/shapes', help='dataset directory written by prepare_data.py')
    p.add_argument('--out_dir', default=None, help='where checkpoints, logs and samples go (default out/<model>)')
    p.add_argument('--resolution', type=int, default=32, help='train at this square size (area-downsampled); 0 = the data size')
    p.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False, help='continue from <out_dir>/ckpt.pt')
    p.add_argument('--tokenizer', default='out/tokenizer/ckpt.pt', help='prior: the tokenizer checkpoint whose codes it models')
    p.add_argument('--max_iters', type=int, default=d['max_iters'], help='optimizer steps in total')
    p.add_argument('--batch_size', type=int, default=d['batch_size'], help='clips per micro-step per process')
    p.add_argument('--grad_accum', type=int, default=1, help='micro-steps per optimizer step')
    p.add_argument('--lr', type=float, default=d['lr'], help='peak learning rate')
    p.add_argument('--min_lr', type=float, default=None, help='learning rate at the end of the cosine (default lr / 10)')
    p.add_argument('--warmup_iters', type=int, default=d['warmup_iters'], help='linear warmup steps')
    p.add_argument('--lr_decay_iters', type=int, default=None, help='cosine decay length (default max_iters)')
    p.add_argument('--weight_decay', type=float, default=d['weight_decay'], help='AdamW weight decay')
    p.add_argument('--optimizer', default=d['optimizer'], choices=['adamw', 'muon'],
                   help="muon (prior only): Muon for the transformer blocks' matrices, AdamW for the rest")
    p.add_argument('--beta1', type=float, default=0.9, help='AdamW beta1')
    p.add_argument('--beta2', type=float, default=0.99, help='AdamW beta2')
    p.add_argument('--grad_clip', type=float, default=1.0, help='clip the gradient norm to this (0 = off)')
    p.add_argument('--ema', type=float, default=d['ema'], help='EMA decay of a weight copy used to evaluate and sample (0 = off)')
    p.add_argument('--device', default='auto', help='auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps')
    p.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help='autocast dtype; auto = bfloat16 where the hardware has it (CUDA, CPUs with AVX-512 BF16 or AMX), '
                        'else float16 on CUDA and float32 on other CPUs')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None, help='torch.compile (default on CUDA only)')
    p.add_argument('--seed', type=int, default=1337, help='seed; each step draws from (seed, rank, step)')
    p.add_argument('--log_interval', type=int, default=50, help='steps between log lines')
    p.add_argument('--eval_interval', type=int, default=d['eval_interval'], help='steps between validation, samples and checkpoints')
    p.add_argument('--eval_iters', type=int, default=8, help='batches per validation estimate')
    cfg_cls = MODELS[model_name][0]
    add_config_flags(p, cfg_cls, skip=DERIVED.get(model_name, ()))
    args = p.parse_args(argv)
    overrides = config_overrides(args, cfg_cls)
    return args, overrides


def check_args(args):
    for name in ('max_iters', 'batch_size', 'grad_accum', 'log_interval', 'eval_interval', 'eval_iters'):
        if getattr(args, name) < 1:
            raise TrainError(f'--{name} must be at least 1, got {getattr(args, name)}')
    if args.lr <= 0:
        raise TrainError(f'--lr must be positive, got {args.lr}')
    if not 0 <= args.ema < 1:
        raise TrainError(f'--ema must be in [0, 1), got {args.ema}')
    if args.resolution < 0:
        raise TrainError(f'--resolution must be 0 (the data size) or positive, got {args.resolution}')
    if args.optimizer == 'muon' and args.model != 'prior':
        raise TrainError(f'--optimizer muon is for the prior (its transformer matrices); train the {args.model} with adamw')
    if args.optimizer == 'muon' and not hasattr(torch.optim, 'Muon'):
        raise TrainError(f'--optimizer muon (the prior\'s default) needs torch >= 2.9 for torch.optim.Muon; this is torch '
                         f'{torch.__version__}: upgrade torch (pip install -r requirements.txt) or pass --optimizer adamw')


# -----------------------------------------------------------------------------
# the run

def get_lr(it: int, args) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over lr_decay_iters."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    if it >= args.lr_decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def seed_of(*parts) -> int:
    """A seed that is a pure function of its parts (Python's hash() of strings differs between processes)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], 'little') >> 1


def data_key(meta: dict, args) -> dict:
    """What a checkpoint's model depends on in its data: a resumed run must match it."""
    return dict(frames=meta['frames'], resolution=args.resolution or meta['size'],
                text=(meta['text']['name'], meta['text']['vocab_size'], meta['text_len']))


def save_checkpoint(path: str, ckpt: dict) -> None:
    """Write to a temporary file, then rename: a kill mid-save never destroys the last good checkpoint."""
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX). Without it oneDNN emulates bfloat16
    matmuls about 100x slower than float32 (1 against 126 GFLOP/s on an AVX2-only EPYC), so auto picks float32."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


def auto_dtype(device_type: str) -> str:
    """--dtype auto: bfloat16 where it is native (CUDA that has it, or a CPU with AVX-512 BF16 or AMX), else
    float16 on CUDA and float32 elsewhere."""
    if (device_type == 'cpu' and cpu_has_bf16()) or (device_type == 'cuda' and torch.cuda.is_bf16_supported()):
        return 'bfloat16'
    return 'float16' if device_type == 'cuda' else 'float32'


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise TrainError(f'no checkpoint at {path}; train one with python train.py --model=... --out_dir '
                         f'{os.path.dirname(path) or "."} (or drop --resume to start from scratch)')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise TrainError(f'{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})') from None
    if ckpt.get('model_type') == 'prior':  # priors saved before rotary positions, prefix or image training had none
        ckpt['config'].setdefault('rope', False)
        ckpt['config'].setdefault('prefix_prob', 0.0)
        ckpt['config'].setdefault('first_prob', 0.0)
        ckpt['config'].setdefault('image_share', 0.0)
    return ckpt


def load_model(path: str, device: str = 'cpu', use_ema: bool = True):
    """A trained model from its checkpoint (EMA weights when the run kept them), in eval mode, and the checkpoint."""
    ckpt = load_checkpoint(path)
    name = ckpt.get('model_type')
    if name not in MODELS:
        raise TrainError(f'{path} holds no model this repo knows (model_type {name!r})')
    cfg_cls, model_cls = MODELS[name]
    model = model_cls(cfg_cls(**ckpt['config']))
    model.load_state_dict(ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model'])
    return model.to(device).eval(), ckpt


def loss_of(model, name: str, x, ids, step):
    """The one place that knows how each model is fed."""
    if name == 'tokenizer':
        return model(x, step=step)[1]
    if name == 'prior':  # x holds tokenizer codes (B, t, h, w)
        return model(ids, x)[1]
    raise AssertionError(name)


@torch.no_grad()
def visualize(model, name: str, x, ids, path: str, fps: float, tok=None):
    """Write what a person should look at: tokenizer reconstructions under their originals, or the prior's
    samples for validation captions under the clips they came from."""
    if name == 'tokenizer':
        rec = model.decode(model.encode(x))
    else:
        rec = tok.decode(model.generate(ids, generator=torch.Generator(device=ids.device).manual_seed(0)))
        x = tok.decode(x)
    videos = prepare_data.to_uint8(torch.cat([x, rec]))
    n = len(x)
    iio.imwrite(path + '.png', prepare_data.contact_sheet(videos[[i // 2 + (i % 2) * n for i in range(2 * n)]]))
    prepare_data.write_video(path + '.gif', videos[n], fps, scale=4)


def tokenizer_key(tok_ckpt: dict) -> str:
    """Names a tokenizer's codes cache: a hash of its weights."""
    h = hashlib.sha256()
    for k, v in sorted(tok_ckpt['model'].items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


@torch.no_grad()
def code_split(data: dict, data_dir: str, tok, key: str, res: int, device: str, batch_size: int = 32) -> dict:
    """The split with its clips replaced by the frozen tokenizer's codes, encoded once and cached next to
    the data as a uint16 memmap (N, t, h, w) named after the tokenizer, so later runs start at once."""
    clips = data['clips']
    path = os.path.join(data_dir, f"{data['split']}_codes_{key}_{res}.u16")
    ft, fs = tok.config.factors
    shape = (len(clips), 1 + (clips.shape[1] - 1) // ft, res // fs, res // fs)
    if tok.codebook_size > 2 ** 16:
        raise TrainError(f'the tokenizer has {tok.codebook_size} codes; the codes cache holds at most 65536')
    if len(clips) == 0:
        return dict(data, clips=np.zeros(shape, np.uint16))
    if not os.path.exists(path):
        tmp = f'{path}.tmp-{os.getpid()}'
        mm = np.memmap(tmp, dtype=np.uint16, mode='w+', shape=shape)
        for i in tqdm(range(0, len(clips), batch_size), desc=f"encode {data['split']}", disable=len(clips) <= batch_size):
            x, _ = prepare_data.get_batch(data, 0, res, idx=np.arange(i, min(len(clips), i + batch_size)))
            mm[i:i + len(x)] = tok.encode(x.to(device)).cpu().numpy().astype(np.uint16)
        mm.flush()
        del mm
        os.replace(tmp, path)
    return dict(data, clips=np.memmap(path, dtype=np.uint16, mode='r', shape=shape))


def train(args, overrides):
    check_args(args)
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        backend = 'nccl' if torch.cuda.is_available() and args.device in ('auto', 'cuda') else 'gloo'
        dist.init_process_group(backend=backend)
        rank, local_rank, world = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
        device = f'cuda:{local_rank}' if backend == 'nccl' else 'cpu'
        if backend == 'nccl':
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = args.device
        if device == 'auto':
            device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    master = rank == 0
    device_type = 'cuda' if device.startswith('cuda') else device
    if args.dtype == 'auto':
        args.dtype = auto_dtype(device_type)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.dtype]
    ctx = nullcontext() if args.dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.compile is None:
        args.compile = device_type == 'cuda'
    if args.compile and device_type == 'cpu' and not any(shutil.which(c) for c in ('g++', 'c++', 'clang++')):
        print('train.py: --compile needs a C++ compiler on CPU (g++ or clang++) and none is installed; '
              'training without it', file=sys.stderr)
        args.compile = False
    args.out_dir = args.out_dir or os.path.join('out', args.model)
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.lr_decay_iters = args.max_iters if args.lr_decay_iters is None else args.lr_decay_iters

    # data
    try:
        train_data = prepare_data.load_split(args.data, 'train')
        val_data = prepare_data.load_split(args.data, 'val')
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from None
    meta = train_data['meta']
    res = args.resolution or meta['size']
    if meta['size'] % res:
        raise TrainError(f"--resolution {res} must divide the data size {meta['size']}")
    if len(train_data['clips']) == 0:
        raise TrainError(f'{args.data} has an empty train split')

    # the prior models a frozen tokenizer's codes, encoded once and cached next to the data
    tok = None
    if args.model == 'prior':
        tok, tok_ckpt = load_model(args.tokenizer, device)
        if tok_ckpt['model_type'] != 'tokenizer':
            raise TrainError(f"--tokenizer {args.tokenizer} is a {tok_ckpt['model_type']} checkpoint, not a tokenizer")
        if tok_ckpt['data_key']['resolution'] != res or tok_ckpt['data_key']['frames'] != meta['frames']:
            raise TrainError(f"--tokenizer {args.tokenizer} was trained on {tok_ckpt['data_key']}, not on "
                             f"{meta['frames']} frames at --resolution {res}")
        key = f'{tokenizer_key(tok_ckpt)}_{args.dtype}'
        if ddp and not master:
            dist.barrier()  # rank 0 encodes the clips, the others then read its cache
        with ctx:
            train_data, val_data = (code_split(d, args.data, tok, key, res, device) for d in (train_data, val_data))
        if ddp and master:
            dist.barrier()
        overrides = dict(overrides, vocab_size=tok.codebook_size, text_vocab=meta['text']['vocab_size'],
                         text_len=meta['text_len'], pad_id=meta['text']['pad_id'], grid=tuple(train_data['clips'].shape[1:]))

    # model, from scratch or from the checkpoint
    cfg_cls, model_cls = MODELS[args.model]
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    if ckpt is not None:
        if ckpt.get('model_type') != args.model:
            raise TrainError(f"{ckpt_path} is a {ckpt.get('model_type')} checkpoint, not a {args.model}; "
                             'use another --out_dir or --model')
        if ckpt['data_key'] != data_key(meta, args):
            raise TrainError(f"{ckpt_path} was trained on data {ckpt['data_key']}, but --data {args.data} "
                             f'--resolution {res} gives {data_key(meta, args)}')
        changed = {k: v for k, v in overrides.items() if ckpt['config'].get(k) != v}
        if any(k in DERIVED.get(args.model, ()) for k in changed):
            diff = ', '.join(f"{k} {ckpt['config'].get(k)} -> {v}" for k, v in changed.items())
            raise TrainError(f'{ckpt_path} was trained with another tokenizer or text vocabulary ({diff})')
        if changed:
            raise TrainError(f'--resume keeps the model config of the checkpoint; drop {", ".join("--" + k for k in changed)}')
        config = cfg_cls(**ckpt['config'])
    else:
        config = cfg_cls(**overrides)
    torch.manual_seed(args.seed)  # the initial weights (DDP then broadcasts rank 0's)
    try:
        model = model_cls(config)
        if hasattr(model, 'check_input'):
            model.check_input(torch.empty(1, 3, meta['frames'], res, res, device='meta'))
    except ValueError as e:
        raise TrainError(str(e)) from None
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
    elif hasattr(model, 'init_from_data'):  # data-dependent init (DDP then copies rank 0's weights to all)
        g = torch.Generator().manual_seed(args.seed)
        model.init_from_data(prepare_data.get_batch(train_data, 64, res, generator=g)[0])
    model.to(device)
    if device_type == 'cpu':  # oneDNN's 3D convolutions run faster channels-last
        model = model.to(memory_format=torch.channels_last_3d)
    muon = {'muon': True} if args.optimizer == 'muon' else {}
    optimizer = Optimizers(model.configure_optimizers(args.weight_decay, args.lr, (args.beta1, args.beta2), device_type, **muon))
    if ckpt is not None:
        if ckpt['args'].get('optimizer', 'adamw') != args.optimizer:
            raise TrainError(f"{ckpt_path} was trained with --optimizer {ckpt['args'].get('optimizer', 'adamw')}; "
                             'resume with it, or start a new --out_dir')
        optimizer.load_state_dict(ckpt['optimizer'])
    ema = None
    if args.ema > 0:
        ema = copy.deepcopy(model).requires_grad_(False)
        if ckpt is not None and ckpt.get('ema') is not None:
            ema.load_state_dict(ckpt['ema'])
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == 'float16')
    start_iter = ckpt['iter_num'] if ckpt is not None else 0
    best_val = ckpt['best_val_loss'] if ckpt is not None else float('inf')
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f'{args.model}: {n_params / 1e6:.2f}M parameters, config {dataclasses.asdict(config)}')
        print(f'training: {vars(args)}')
        print(f'device {device}, dtype {args.dtype}, compile {args.compile}, world {world}, '
              f'{args.batch_size * args.grad_accum * world} clips per step, from step {start_iter}')
    log_path = os.path.join(args.out_dir, 'log.jsonl')

    def log(rec):
        print(' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in rec.items()), flush=True)
        with open(log_path, 'a') as f:
            f.write(json.dumps(rec) + '\n')

    def batch(split_data, step, micro, which):
        """This rank's slice of the global batch of (step, micro-step): a pure function of the seed, so a
        resumed run draws the same clips, and N processes draw what one process with N times the batch would."""
        g = torch.Generator().manual_seed(seed_of(args.seed, which, step, micro))
        idx = torch.randint(len(split_data['clips']), (args.batch_size * world,), generator=g)
        mine = idx[rank * args.batch_size:(rank + 1) * args.batch_size]
        if tok is not None:  # the prior trains on cached codes
            mine = np.sort(mine.numpy())
            x, ids = torch.from_numpy(split_data['clips'][mine].astype(np.int64)), torch.from_numpy(split_data['ids'][mine].astype(np.int64))
        else:
            x, ids = prepare_data.get_batch(split_data, 0, res, idx=mine)
        return x.to(device, non_blocking=True), ids.to(device, non_blocking=True)

    @torch.no_grad()
    def evaluate(eval_model):
        eval_model.eval()
        out = {}
        for name, data in (('train', train_data), ('val', val_data)):
            if len(data['clips']) == 0:
                continue
            losses = []
            for k in range(args.eval_iters):
                torch.manual_seed(args.seed + k)
                x, ids = batch(data, -1, k, 'eval')  # the same batches at every evaluation
                with ctx:
                    losses.append(loss_of(eval_model, args.model, x, ids, None).item())
            out[name] = sum(losses) / len(losses)
        eval_model.train()
        return out

    def checkpoint(it):
        return dict(model_type=args.model, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                    ema=ema.state_dict() if ema is not None else None, config=dataclasses.asdict(config),
                    args=vars(args), iter_num=it, best_val_loss=best_val, data_meta=meta, data_key=data_key(meta, args),
                    tokenizer=None if tok is None else dict(config=dataclasses.asdict(tok.config), model=tok.state_dict()))

    def eval_and_save(it):
        nonlocal best_val
        eval_model = ema if ema is not None else raw_model
        losses = evaluate(eval_model)
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainError(f'validation loss is {losses} at step {it}; the last good checkpoint is {ckpt_path}')
        best_val = min(best_val, losses.get('val', float('inf')))
        log(dict(iter=it, train_loss=losses.get('train'), val_loss=losses.get('val'), best_val_loss=best_val))
        save_checkpoint(ckpt_path, checkpoint(it))
        x, ids = batch(val_data if len(val_data['clips']) else train_data, -1, 0, 'sample')
        visualize(eval_model, args.model, x[:4], ids[:4], os.path.join(args.out_dir, f'sample_{it:06d}'), meta['fps'], tok)

    t0 = time.time()
    it = start_iter
    while it < args.max_iters:
        if it % args.eval_interval == 0 and it > start_iter and master:
            eval_and_save(it)
        lr = get_lr(it, args)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_mult', 1.0)
        torch.manual_seed(seed_of(args.seed, 'model', it, rank))  # dropout, masks, noise of this step
        for micro in range(args.grad_accum):
            if ddp:  # sync gradients on the last micro-step only
                model.require_backward_grad_sync = micro == args.grad_accum - 1
            x, ids = batch(train_data, it, micro, 'train')
            with ctx:
                loss = loss_of(model, args.model, x, ids, it) / args.grad_accum
            scaler.scale(loss).backward()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), raw_model.parameters()):
                    pe.lerp_(pm, 1 - args.ema)
        it += 1
        if it % args.log_interval == 0 and master:
            lossf = loss.item() * args.grad_accum
            if not math.isfinite(lossf):
                raise TrainError(f'loss is {lossf} at step {it}; stopped. The last good checkpoint is {ckpt_path} '
                                 '(try a lower --lr or --dtype float32)')
            dt = (time.time() - t0) / args.log_interval
            t0 = time.time()
            clips = args.batch_size * args.grad_accum * world
            extra = {k: round(v.item(), 5) for k, v in getattr(raw_model, 'last_losses', {}).items()}
            log(dict(iter=it, loss=round(lossf, 5), lr=float(f'{lr:.3e}'), ms=round(dt * 1000, 1),
                     clips_per_s=round(clips / dt, 1), **extra))
    if master:
        eval_and_save(it)
    if ddp:  # tear down together: a rank that leaves while rank 0 still saves can abort in gloo's threads
        dist.barrier()
        dist.destroy_process_group()
    return raw_model


def main(argv=None) -> int:
    args, overrides = get_args(argv)
    try:
        train(args, overrides)
    except TrainError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    code = main()
    if int(os.environ.get('RANK', -1)) != -1:  # under torchrun every rank has saved, met and left the process group:
        sys.stdout.flush()  # leave without the interpreter's teardown, where gloo now and then aborts the rank
        sys.stderr.flush()  # that ends first ("terminate called without an active exception") and fails the run
        os._exit(code)
    sys.exit(code)
