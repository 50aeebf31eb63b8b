"""
One training loop for every model, nanoGPT style.

    python train.py --model=tokenizer                                     # single process, CPU or GPU
    python train.py --model=prior --mode=mask --tokenizer out/tokenizer/ckpt.pt
    python train.py --model=superres --data data/shapes                 # 32x32 -> 64x64 (--scale_t 2: in time)
    python train.py --model=diffusion --tokenizer out/tokenizer/ckpt.pt  # latent diffusion (--space=pixel: pixels)
    torchrun --standalone --nproc_per_node=2 train.py --model=tokenizer   # DDP (Gloo on CPU, NCCL on GPU)

Flags named like a model's config fields (`--channels`, `--levels 8,5,5,5`, `--lr`) set that field, and the
config's defaults are the model's CPU recipe: `python train.py --model=prior --help` lists them. Every model
file has the same small interface, so a new model is a row in MODELS:
    XConfig                  a dataclass: the architecture, then the recipe (optimizer, lr, batch_size, max_iters, ema)
    X.reads                  'pixels' (clips), 'codes' (a frozen tokenizer's, encoded once and cached here) or
                             'latents' (the tokenizer's quantized latents of those codes); a config's own `reads`
                             wins where it depends on a field (diffusion's --space)
    X.kind                   'codec' (sample reconstructs x), 'generator' (sample makes videos from text) or
                             'upsampler' (sample enlarges the video x; forward makes its own smaller input)
    X.from_checkpoint(ckpt)  the trained model, with any backward compatibility it needs
    init_from_data(x, text)  checks that a batch of the data fits, and any data-dependent start
    forward(x, text, step)   -> (out, loss); the model draws its own masks, noise or dropout
    configure_optimizers(device_type) -> [optimizers]
    sample(text, x, generator, **settings)
Every step's randomness is a function of (seed, rank, step), so --resume continues exactly where a run stopped.
"""
import argparse
import copy
import dataclasses
import datetime
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

import diffusion
import prepare_data
import prior
import superres
import tokenizer

MODELS = {  # --model -> (config class, model class)
    'tokenizer': (tokenizer.TokenizerConfig, tokenizer.Tokenizer),
    'prior': (prior.PriorConfig, prior.Prior),
    'superres': (superres.SuperResConfig, superres.SuperRes),
    'diffusion': (diffusion.DiffusionConfig, diffusion.Diffusion),
}
DATA_FIELDS = ('vocab_size', 'grid', 'in_channels', 'text_vocab', 'text_len', 'pad_id')  # set from the data
RESUMABLE = ('lr', 'batch_size', 'max_iters', 'ema')  # config fields that a resumed run may change
RETIRED = {  # flags that README versions documented, and what replaced them
    '--first_prob': '--image_share (a mask prior now trains the first latent frame as an image)',
    '--beta1': '--betas B1,B2', '--beta2': '--betas B1,B2',
}


class TrainError(Exception):
    """A bad flag, checkpoint or dataset: printed as one line, exit code 2."""


# -----------------------------------------------------------------------------
# flags

def field_help(cls) -> dict[str, str]:
    """The trailing comment of each dataclass field (and its indented continuation lines), used as its --help."""
    helps, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        field, more = re.match(r'\s+(\w+): [^=]+=.*?#\s*(.*)$', line), re.match(r'\s+#\s{2,}(.*)$', line)
        if field:
            last = field.group(1)
            helps[last] = field.group(2)
        elif more and last:
            helps[last] += ' ' + more.group(1)
        else:
            last = None
    return helps


def parse_bool(text: str) -> bool:
    """1/0, true/false, yes/no (bool('0') would be True)."""
    word = text.strip().lower()
    if word not in ('1', '0', 'true', 'false', 'yes', 'no'):
        raise ValueError(text)
    return word in ('1', 'true', 'yes')


def parse_tuple(kind):
    convert = parse_bool if kind is bool else kind
    def parse(text):
        try:
            return tuple(convert(v) for v in text.split(',') if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got '{text}'") from None
    return parse


def add_config_flags(p: argparse.ArgumentParser, cfg_cls, skip=()) -> None:
    """A flag per config field, named like it; a flag not given is not in args (the config default holds)."""
    g = p.add_argument_group(f"{cfg_cls.__name__}'s fields: the architecture, then the training recipe")
    helps = field_help(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        if f.name in skip:
            continue
        kind, default = type(f.default), f.default
        kw = dict(default=argparse.SUPPRESS, help=f'{helps.get(f.name, f.name)} (default: {default})')
        if kind is bool:
            g.add_argument(f'--{f.name}', action=argparse.BooleanOptionalAction, **kw)
        elif kind is tuple:
            g.add_argument(f'--{f.name}', type=parse_tuple(type(default[0]) if default else int), **kw)
        else:
            g.add_argument(f'--{f.name}', type=kind, **kw)


def config_overrides(args, cfg_cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg_cls)
            if getattr(args, f.name, None) is not None}


def refuse_retired(p: argparse.ArgumentParser, argv) -> None:
    for a in argv:
        if a.split('=')[0] in RETIRED:
            p.error(f"{a.split('=')[0]} was removed; use {RETIRED[a.split('=')[0]]}")


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--model', default='tokenizer', choices=list(MODELS))
    cfg_cls = MODELS[pre.parse_known_args(argv)[0].model][0]
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, on_off = p.add_argument, argparse.BooleanOptionalAction
    add('--model', default='tokenizer', choices=list(MODELS), help='which model to train')
    add('--data', default='data/shapes', help='dataset directory written by prepare_data.py')
    add('--out_dir', default=None, help='where checkpoints, logs and samples go (default out/<model>)')
    add('--resume', action=on_off, default=False, help='continue from <out_dir>/ckpt.pt')
    add('--tokenizer', default='out/tokenizer/ckpt.pt', help='a model of codes or latents: the tokenizer checkpoint')
    add('--init_from', default=None, help="start from this checkpoint's weights (same model and sizes), with a new "
        'optimizer and step 0: e.g. a diffusion model trained --image_pretrain, fine-tuned on clips')
    add('--grad_accum', type=int, default=1, help='micro-steps per optimizer step')
    add('--min_lr', type=float, default=None, help='learning rate at the end of the cosine (default lr / 10)')
    add('--warmup_iters', type=int, default=100, help='linear warmup steps')
    add('--lr_decay_iters', type=int, default=None, help='cosine decay length (default max_iters)')
    add('--grad_clip', type=float, default=1.0, help='clip the gradient norm to this (0 = off)')
    add('--device', default='auto', help='auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps')
    add('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
        help='autocast dtype; auto = bfloat16 where the hardware has it (CUDA, CPUs with AVX-512 BF16 or AMX), '
             'else float16 on CUDA and float32 on other CPUs')
    add('--compile', action=on_off, default=None, help='torch.compile (default on CUDA only)')
    add('--seed', type=int, default=1337, help='seed; each step draws from (seed, rank, step)')
    add('--log_interval', type=int, default=50, help='steps between log lines')
    add('--eval_interval', type=int, default=500, help='steps between validation, samples and checkpoints')
    add('--eval_iters', type=int, default=8, help='batches per validation estimate')
    add_config_flags(p, cfg_cls, skip=DATA_FIELDS)
    refuse_retired(p, argv)
    args = p.parse_args(argv)
    return args, config_overrides(args, cfg_cls)


def check_args(args, config) -> None:
    for name, value in (('max_iters', config.max_iters), ('batch_size', config.batch_size), *(
            (k, getattr(args, k)) for k in ('grad_accum', 'log_interval', 'eval_interval', 'eval_iters'))):
        if value < 1:
            raise TrainError(f'--{name} must be at least 1, got {value}')
    if config.lr <= 0:
        raise TrainError(f'--lr must be positive, got {config.lr}')
    if not 0 <= config.ema < 1:
        raise TrainError(f'--ema must be in [0, 1), got {config.ema}')
    if config.resolution < 0:
        raise TrainError(f'--resolution must be 0 (the data size) or positive, got {config.resolution}')


# -----------------------------------------------------------------------------
# device and dtype (sample.py, eval.py and bench.py use these too)

def auto_device(device: str) -> str:
    if device != 'auto':
        return device
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX). Without it oneDNN emulates bfloat16
    matmuls about 100x slower than float32 (1 against 126 GFLOP/s on an AVX2-only EPYC), so auto picks float32."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


def auto_dtype(dtype: str, device: str) -> str:
    """--dtype auto: bfloat16 where it is native (CUDA that has it, or a CPU with AVX-512 BF16 or AMX), else
    float16 on CUDA and float32 elsewhere."""
    if dtype != 'auto':
        return dtype
    device_type = device.split(':')[0]
    native_cuda = device_type == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)  # not T4, V100
    if (device_type == 'cpu' and cpu_has_bf16()) or native_cuda:
        return 'bfloat16'
    return 'float16' if device_type == 'cuda' else 'float32'


def flush_denormals(device: str) -> None:
    """On CPU, compute with float32 numbers under 1.2e-38 (denormals) as zero, as TensorFlow's CPU kernels do:
    a float32 matmul that reads them ran 200x slower on an Intel Xeon (RESULTS.md)."""
    if device.split(':')[0] == 'cpu':
        torch.set_flush_denormal(True)


def autocast(device: str, dtype: str):
    """The autocast context of a --dtype, nothing for float32."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device.split(':')[0], dtype={'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype])


# -----------------------------------------------------------------------------
# checkpoints

def read_checkpoint(path: str, hint: str = 'train one with python train.py') -> dict:
    """A checkpoint dict, or a TrainError that says what to do (hint: if there is none). Checkpoints written
    before the training recipe moved into the config keep it in their args, from where it is read back."""
    if not os.path.exists(path):
        raise TrainError(f'no checkpoint at {path}; {hint}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise TrainError(f'{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})') from None
    if not isinstance(ckpt, dict) or ckpt.get('model_type') not in MODELS:
        raise TrainError(f'{path} holds no model this repo knows '
                         f'(model_type {ckpt.get("model_type") if isinstance(ckpt, dict) else None!r})')
    old = ckpt.get('args', {})
    for k in ('optimizer', 'lr', 'weight_decay', 'batch_size', 'max_iters', 'ema', 'resolution'):
        if k in old:
            ckpt['config'].setdefault(k, old[k])
    if 'beta1' in old:
        ckpt['config'].setdefault('betas', (old['beta1'], old['beta2']))
    return ckpt


def load_model(ckpt: dict, device: str, use_ema: bool = True):
    """The trained model of a checkpoint dict, in eval mode on device."""
    try:
        model = MODELS[ckpt['model_type']][1].from_checkpoint(ckpt, use_ema)
    except TypeError as e:  # a config field that this version of the model file does not know
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if not unknown:
            raise
        raise TrainError(f"this {ckpt['model_type']} checkpoint's config has a field this version does not know "
                         f"({unknown[1]}): load it with the version of the code that wrote it") from None
    return to_device(model, device).eval()


def to_device(model, device: str):
    """model on device, on CPU channels-last, for training and inference alike: oneDNN's 3D convolutions run
    faster so (the tokenizer encodes 1.3x and the upsampler upsamples 1.7x as fast: RESULTS.md)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last_3d) if device.split(':')[0] == 'cpu' else model


def save_checkpoint(path: str, ckpt: dict) -> None:
    """Write to a temporary file, then rename: a kill mid-save never destroys the last good checkpoint."""
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def data_key(meta: dict, res: int) -> dict:
    """What a checkpoint's model depends on in its data: a resumed run must match it."""
    return dict(frames=meta['frames'], resolution=res,
                text=(meta['text']['name'], meta['text']['vocab_size'], meta['text_len']))


# -----------------------------------------------------------------------------
# data: clips, or the codes of a frozen tokenizer, cached next to the data

def load_data(args, resolution: int) -> tuple[dict, int]:
    """Both splits of --data, and the size the clips train at (resolution, or 0 for the data's)."""
    try:
        splits = {s: prepare_data.load_split(args.data, s) for s in ('train', 'val')}
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from None
    meta = splits['train']['meta']
    res = resolution or meta['size']
    if meta['size'] % res:
        raise TrainError(f"--resolution {res} must divide the data size {meta['size']}")
    if len(splits['train']['clips']) == 0:
        raise TrainError(f'{args.data} has an empty train split')
    return splits, res


def tokenizer_key(tok_ckpt: dict) -> str:
    """Names a tokenizer's codes cache: a hash of its weights."""
    h = hashlib.sha256()
    for k, v in sorted(tok_ckpt['model'].items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


@torch.no_grad()
def encode_split(data: dict, path: str, tok, res: int, device: str, batch_size: int = 32) -> dict:
    """The split with the frozen tokenizer's codes of its clips, encoded once into a uint16 memmap (N, t, h, w) at
    path, so later runs start at once."""
    clips = data['clips']
    ft, fs = tok.config.factors
    shape = (len(clips), 1 + (clips.shape[1] - 1) // ft, res // fs, res // fs)
    if tok.codebook_size > 2 ** 16:  # (latents are looked up from the codes: latent_table)
        raise TrainError(f'the tokenizer has {tok.codebook_size} codes; the codes cache holds at most 65536')
    if len(clips) == 0:
        return dict(data, codes=np.zeros(shape, np.uint16))
    if not os.path.exists(path):
        tmp = f'{path}.tmp-{os.getpid()}'
        mm = np.memmap(tmp, dtype=np.uint16, mode='w+', shape=shape)
        for i in tqdm(range(0, len(clips), batch_size), desc=f"encode {data['split']}",
                      disable=len(clips) <= batch_size):
            x, _ = prepare_data.get_batch(data, 0, res, idx=np.arange(i, min(len(clips), i + batch_size)))
            mm[i:i + len(x)] = tok.encode(x.to(device)).cpu().numpy().astype(np.uint16)
        mm.flush()
        del mm
        os.replace(tmp, path)
    return dict(data, codes=np.memmap(path, dtype=np.uint16, mode='r', shape=shape))


def encode_splits(args, splits: dict, res: int, device: str, ctx, ddp: bool, master: bool):
    """The tokenizer of --tokenizer, and the splits with its codes (rank 0 encodes, the others read its cache)."""
    tok_ckpt = read_checkpoint(args.tokenizer, f'train one with python train.py --model=tokenizer --out_dir '
                                                   f'{os.path.dirname(args.tokenizer) or "."}')
    if tok_ckpt['model_type'] != 'tokenizer':
        raise TrainError(f"--tokenizer {args.tokenizer} is a {tok_ckpt['model_type']} checkpoint, not a tokenizer")
    meta = splits['train']['meta']
    if tok_ckpt['data_key']['resolution'] != res or tok_ckpt['data_key']['frames'] != meta['frames']:
        raise TrainError(f"--tokenizer {args.tokenizer} was trained on {tok_ckpt['data_key']}, not on "
                         f"{meta['frames']} frames at --resolution {res}")
    tok = load_model(tok_ckpt, device)
    key = f'{tokenizer_key(tok_ckpt)}_{args.dtype}'
    if ddp and not master:
        dist.barrier()
    with ctx:
        splits = {s: encode_split(d, os.path.join(args.data, f'{s}_codes_{key}_{res}.u16'), tok, res, device)
                  for s, d in splits.items()}
    if ddp and master:
        dist.barrier()
    return tok, splits


def reads_of(model_cls, config) -> str:
    """What a model's forward reads: 'pixels', 'codes' or 'latents'; the config says where it depends on a field."""
    return config.reads if hasattr(config, 'reads') else model_cls.reads


@torch.no_grad()
def latent_table(tok) -> torch.Tensor:
    """(codebook size, d): the quantized latent of each code, by which cached codes become latents."""
    return tok.quant.indices_to_codes(torch.arange(tok.codebook_size, device=next(tok.parameters()).device)).cpu()


@torch.no_grad()
def to_clips(reads: str, tok, x):
    """What a model makes or reads -> clips (B, 3, T, H, W) in [-1, 1]: codes and latents through the tokenizer's
    decoder, latents first snapped to their nearest code (the latents the decoder was trained on)."""
    if reads == 'pixels':
        return x
    if reads == 'latents':
        table = latent_table(tok).to(x.device)  # (V, d)
        flat = x.float().movedim(1, -1)  # (B, t, h, w, d)
        x = torch.cdist(flat.reshape(-1, table.shape[1]), table).argmin(1).view(flat.shape[:-1])  # (B, t, h, w)
    return tok.decode(x)


@torch.no_grad()
def from_clips(reads: str, tok, x):
    """Clips (B, 3, T, H, W) in [-1, 1] -> what a model reads: codes, quantized latents or the clips themselves."""
    if reads == 'pixels':
        return x
    codes = tok.encode(x)
    return codes if reads == 'codes' else tok.quant.indices_to_codes(codes)


def read_batch(data: dict, idx, res: int, device: str):
    """Rows idx of a split: its cached codes (B, t, h, w) when it has them (their latents (B, d, t, h, w) when it has
    a latent_table), else clips (B, 3, T, res, res) in [-1, 1]; and their caption ids (B, text_len)."""
    idx = np.sort(np.asarray(idx))  # sorted reads are sequential on disk
    if 'latent_table' in data:
        x = data['latent_table'][torch.from_numpy(data['codes'][idx].astype(np.int64))].permute(0, 4, 1, 2, 3)
    elif 'codes' in data:
        x = torch.from_numpy(data['codes'][idx].astype(np.int64))
    else:
        x = prepare_data.to_model(data['clips'][idx], res)
    ids = torch.from_numpy(data['ids'][idx].astype(np.int64))
    return x.to(device, non_blocking=True), ids.to(device, non_blocking=True)


def seed_of(*parts) -> int:
    """A seed that is a pure function of its parts (Python's hash() of strings differs between processes)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], 'little') >> 1


def get_batch(data: dict, seed: tuple, batch_size: int, rank: int, world: int, res: int, device: str):
    """This rank's share of a global batch drawn from seed: a pure function of it, so a resumed run draws the
    same clips, and N processes draw what one process with N times the batch would."""
    g = torch.Generator().manual_seed(seed_of(*seed))
    idx = torch.randint(len(data['clips']), (batch_size * world,), generator=g)
    return read_batch(data, idx[rank * batch_size:(rank + 1) * batch_size], res, device)


# -----------------------------------------------------------------------------
# evaluation and what a person looks at

def get_lr(it: int, lr: float, args) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over lr_decay_iters."""
    if it < args.warmup_iters:
        return lr * (it + 1) / (args.warmup_iters + 1)
    if it >= args.lr_decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - args.min_lr)


@torch.no_grad()
def estimate_loss(model, splits: dict, args, batch_size: int, res: int, device: str, ctx) -> dict:
    """The mean loss of args.eval_iters batches of each split, the same batches at every evaluation."""
    model.eval()
    out = {}
    for name, data in splits.items():
        if len(data['clips']) == 0:
            continue
        losses = []
        for k in range(args.eval_iters):
            torch.manual_seed(args.seed + k)
            x, ids = get_batch(data, (args.seed, 'eval', -1, k), batch_size, 0, 1, res, device)
            with ctx:
                losses.append(model(x, ids)[1].item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def preview(model, tok, x, ids, path: str, fps: float) -> None:
    """A PNG of clips over what the model makes of them (samples for their captions, or what its forward makes
    of them: a reconstruction, an upsampling of a smaller copy) and a GIF of the first one made."""
    g = torch.Generator(device=x.device).manual_seed(0)
    training = model.training  # forward in eval mode: whole clips, though an upsampler trains on crops
    made = model.eval().sample(ids, generator=g) if model.kind == 'generator' else model.eval()(x, ids)[0]
    model.train(training)
    made, x = to_clips(model.reads, tok, made), to_clips(model.reads, tok, x)
    videos = prepare_data.to_uint8(torch.cat([x, made]))
    n = len(x)
    iio.imwrite(path + '.png', prepare_data.contact_sheet(videos[[i // 2 + (i % 2) * n for i in range(2 * n)]]))
    prepare_data.write_video(path + '.gif', videos[n], fps, scale=4)


# -----------------------------------------------------------------------------
# the run

def wrap(model, ddp: bool, compile: bool, device_id):
    """(the model that trains, its DDP module or None): DDP first, then compiled, so that the compiled graph
    is split at DDP's gradient buckets and their all-reduce overlaps the backward (PyTorch's DDP + compile
    notes); compiled first, the all-reduce would wait for the whole backward."""
    ddp_model = DDP(model, device_ids=None if device_id is None else [device_id]) if ddp else None
    model = model if ddp_model is None else ddp_model
    return (torch.compile(model) if compile else model), ddp_model


def missing_compiler(device: str) -> str | None:
    """What torch.compile on this device needs and this machine lacks, or None: inductor writes C++ for the
    CPU, and Triton builds its CUDA launchers with a C compiler."""
    needs = {'cuda': ('a C compiler on CUDA (gcc or clang)', ('gcc', 'cc', 'clang')),
             'cpu': ('a C++ compiler on CPU (g++ or clang++)', ('g++', 'c++', 'clang++'))}.get(device.split(':')[0])
    return None if needs is None or any(shutil.which(c) for c in needs[1]) else needs[0]


def setup(args):
    """Processes, device and dtype: (ddp, rank, world, local rank, device). Fills in args' auto values."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world, local_rank, device = 0, 1, 0, auto_device(args.device)
    if ddp:
        backend = 'nccl' if torch.cuda.is_available() and args.device in ('auto', 'cuda') else 'gloo'
        # an hour, not NCCL's 10 minutes: the other ranks wait while rank 0 encodes a large dataset's codes
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=1))
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ['LOCAL_RANK'])
        device = f'cuda:{local_rank}' if backend == 'nccl' else 'cpu'
        if backend == 'nccl':
            torch.cuda.set_device(device)
    args.dtype = auto_dtype(args.dtype, device)
    flush_denormals(device)
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.compile = device.startswith('cuda') if args.compile is None else args.compile
    missing = args.compile and missing_compiler(device)
    if missing:
        print(f'train.py: --compile needs {missing} and none is installed; training without it', file=sys.stderr)
        args.compile = False
    args.out_dir = args.out_dir or os.path.join('out', args.model)
    return ddp, rank, world, local_rank, device


def read_resumed(args) -> dict:
    """The checkpoint in --out_dir that --resume continues."""
    path = os.path.join(args.out_dir, 'ckpt.pt')
    ckpt = read_checkpoint(path, f'train one with python train.py --model={args.model} --out_dir {args.out_dir}, '
                                 'or drop --resume')
    if ckpt['model_type'] != args.model:
        raise TrainError(f"{path} is a {ckpt['model_type']} checkpoint, not a {args.model}; "
                         'use another --out_dir or --model')
    return ckpt


def build_model(args, overrides: dict, splits: dict, res: int, ckpt: dict | None):
    """A new model takes the config defaults and flags, then init_from_data on a batch; a resumed one the
    checkpoint's config, changing only RESUMABLE."""
    cfg_cls, model_cls = MODELS[args.model]
    meta, path = splits['train']['meta'], os.path.join(args.out_dir, 'ckpt.pt')
    if ckpt is not None:
        if ckpt['data_key'] != data_key(meta, res):
            raise TrainError(f"{path} was trained on data {ckpt['data_key']}, but --data {args.data} "
                             f'--resolution {res} gives {data_key(meta, res)}')
        changed = {k: v for k, v in overrides.items() if ckpt['config'].get(k) != v and k not in RESUMABLE}
        if any(k in DATA_FIELDS for k in changed):
            diff = ', '.join(f"{k} {ckpt['config'].get(k)} -> {v}" for k, v in changed.items())
            raise TrainError(f'{path} was trained with another tokenizer or text vocabulary ({diff})')
        if changed:
            was = ', '.join(f"--{k} {ckpt['config'].get(k)}" for k in changed)
            raise TrainError(f'--resume keeps the config of the checkpoint, which was trained with {was}; drop '
                             f'{", ".join("--" + k for k in changed)} or start a new --out_dir')
    torch.manual_seed(args.seed)  # the initial weights (DDP then broadcasts rank 0's)
    try:
        if ckpt is not None:
            model = model_cls.from_checkpoint(ckpt, use_ema=False)
            model.config = dataclasses.replace(model.config, **{k: v for k, v in overrides.items() if k in RESUMABLE})
            return model
        model = model_cls(cfg_cls(**overrides))
        g = torch.Generator().manual_seed(args.seed)
        model.init_from_data(*read_batch(splits['train'], torch.randint(len(splits['train']['clips']), (64,),
                                                                        generator=g), res, 'cpu'))
        return model
    except ValueError as e:
        raise TrainError(str(e)) from None


def init_weights(model, path: str) -> None:
    """--init_from: the weights (EMA where kept) of another run of this model with the same sizes; data-dependent
    buffers (a latent scale) come along."""
    src = read_checkpoint(path)
    if MODELS[src['model_type']][1] is not type(model):
        raise TrainError(f"--init_from {path} is a {src['model_type']} checkpoint; it must be the same model")
    try:
        model.load_state_dict(src['ema'] if src.get('ema') is not None else src['model'])
    except RuntimeError as e:
        raise TrainError(f'--init_from {path} has other sizes than this model ({str(e).strip().splitlines()[-1].strip()}); '
                         'give the same architecture flags') from None


def log(out_dir: str, rec: dict) -> None:
    """One line for a person, and the same record in out_dir/log.jsonl."""
    print(' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in rec.items()), flush=True)
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(rec) + '\n')


def train(args, overrides):
    # setup: flags, processes, device, dtype
    check_args(args, MODELS[args.model][0](**overrides))
    ddp, rank, world, local_rank, device = setup(args)
    master, device_type, ctx = rank == 0, device.split(':')[0], autocast(device, args.dtype)
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')

    # data at the config's resolution (the checkpoint's on --resume), and for a model that reads codes or latents
    # the tokenizer's; both set the config's data fields
    ckpt = read_resumed(args) if args.resume else None
    cfg_cls, model_cls = MODELS[args.model]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    known = {k: v for k, v in (ckpt['config'] if ckpt else overrides).items() if k in fields}  # not retired fields
    reads = reads_of(model_cls, cfg_cls(**known))
    resolution = ckpt['config']['resolution'] if ckpt else cfg_cls.resolution
    splits, res = load_data(args, overrides.get('resolution', resolution))
    meta, tok = splits['train']['meta'], None
    facts = dict(text_vocab=meta['text']['vocab_size'], text_len=meta['text_len'], pad_id=meta['text']['pad_id'],
                 grid=(meta['frames'], res, res), in_channels=3)
    if reads in ('codes', 'latents'):
        tok, splits = encode_splits(args, splits, res, device, ctx, ddp, master)
        facts.update(vocab_size=tok.codebook_size, grid=tuple(splits['train']['codes'].shape[1:]),
                     in_channels=tok.config.latent_dim)
    if reads == 'latents':
        splits = {s: dict(d, latent_table=latent_table(tok)) for s, d in splits.items()}
    overrides = {**overrides, **{k: v for k, v in facts.items() if k in fields}}

    # model, from scratch or from the checkpoint
    model = build_model(args, overrides, splits, res, ckpt)
    if args.init_from and ckpt is None:
        init_weights(model, args.init_from)
    config = model.config
    args.min_lr = config.lr / 10 if args.min_lr is None else args.min_lr
    args.lr_decay_iters = config.max_iters if args.lr_decay_iters is None else args.lr_decay_iters
    model = to_device(model, device)

    # optimizers, EMA, compile, DDP
    try:
        optimizers = model.configure_optimizers(device_type)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if ckpt is not None:
        states = ckpt['optimizer']  # a list; one optimizer's dict, or {'optimizers': [...]}, before
        states = states if isinstance(states, list) else states.get('optimizers', [states])
        for o, s in zip(optimizers, states, strict=True):
            o.load_state_dict(s)
    ema = copy.deepcopy(model).requires_grad_(False) if config.ema > 0 else None
    ema_params, model_params = (list(ema.parameters()), list(model.parameters())) if ema is not None else ([], [])
    if ema is not None and ckpt is not None and ckpt.get('ema') is not None:
        ema.load_state_dict(ckpt['ema'])
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == 'float16')
    it = ckpt['iter_num'] if ckpt is not None else 0
    best_val = ckpt['best_val_loss'] if ckpt is not None else float('inf')
    raw_model = model  # saved, evaluated and sampled: no _orig_mod. or module. prefixes
    model, ddp_model = wrap(model, ddp, args.compile, local_rank if device_type == 'cuda' else None)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f'{args.model}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, '
              f'config {dataclasses.asdict(config)}\ntraining: {vars(args)}\ndevice {device}, dtype {args.dtype}, '
              f'compile {args.compile}, world {world}, {config.batch_size * args.grad_accum * world} clips per '
              f'step, from step {it}')

    # evaluation, checkpoint and what a person looks at, on rank 0
    def evaluate_and_save(it):
        nonlocal best_val
        eval_model = ema if ema is not None else raw_model
        losses = estimate_loss(eval_model, splits, args, config.batch_size, res, device, ctx)
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainError(f'validation loss is {losses} at step {it}; the last good checkpoint is {ckpt_path}')
        best_val = min(best_val, losses.get('val', float('inf')))
        log(args.out_dir, dict(iter=it, train_loss=losses.get('train'), val_loss=losses.get('val'),
                               best_val_loss=best_val))
        save_checkpoint(ckpt_path, dict(
            model_type=args.model, model=raw_model.state_dict(), optimizer=[o.state_dict() for o in optimizers],
            ema=None if ema is None else ema.state_dict(), config=dataclasses.asdict(config), args=vars(args),
            iter_num=it, best_val_loss=best_val, data_meta=meta, data_key=data_key(meta, res),
            tokenizer=None if tok is None else dict(config=dataclasses.asdict(tok.config), model=tok.state_dict())))
        shown = splits['val'] if len(splits['val']['clips']) else splits['train']
        x, ids = get_batch(shown, (args.seed, 'sample', -1, 0), config.batch_size, 0, 1, res, device)
        preview(eval_model, tok, x[:4], ids[:4], os.path.join(args.out_dir, f'sample_{it:06d}'), meta['fps'])

    # the loop
    start, t0 = it, time.time()
    while it < config.max_iters:
        if it % args.eval_interval == 0 and it > start and master:
            evaluate_and_save(it)
        lr = get_lr(it, config.lr, args)
        for group in (g for o in optimizers for g in o.param_groups):
            group['lr'] = lr
        torch.manual_seed(seed_of(args.seed, 'model', it, rank))  # dropout, masks, noise of this step
        for micro in range(args.grad_accum):
            if ddp:  # sync gradients on the last micro-step only
                ddp_model.require_backward_grad_sync = micro == args.grad_accum - 1
            x, ids = get_batch(splits['train'], (args.seed, 'train', it, micro), config.batch_size, rank, world,
                               res, device)
            with ctx:
                loss = model(x, ids, it)[1] / args.grad_accum
            scaler.scale(loss).backward()
        if args.grad_clip > 0:
            for o in optimizers:
                scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        for o in optimizers:
            scaler.step(o)
        scaler.update()
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        if ema is not None:  # one fused update of every tensor, not a kernel each
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1 - config.ema)
        it += 1
        if it % args.log_interval == 0 and master:
            lossf = loss.item() * args.grad_accum
            if not math.isfinite(lossf):
                raise TrainError(f'loss is {lossf} at step {it}; stopped. The last good checkpoint is {ckpt_path} '
                                 '(try a lower --lr or --dtype float32)')
            dt, t0 = (time.time() - t0) / args.log_interval, time.time()
            parts = {k: round(v.item(), 5) for k, v in raw_model.last_losses.items()}
            log(args.out_dir, dict(iter=it, loss=round(lossf, 5), lr=float(f'{lr:.3e}'), ms=round(dt * 1000, 1),
                                   clips_per_s=round(config.batch_size * args.grad_accum * world / dt, 1), **parts))
    if master:
        evaluate_and_save(it)
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
