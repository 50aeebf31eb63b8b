"""
Video super-resolution in space (x2, x4) and frame interpolation in time (x2): the last stage of text to video,
as Make-A-Video's spatial super-resolution and frame interpolation networks, in a small pseudo-3D form.

The network takes the low-resolution video and predicts the high-resolution one as a residual over a fixed
upsample (bicubic in space, a linear cross-fade in time), so at initialisation it returns that upsample exactly
and training only has to add what the fixed one misses. Its blocks are pseudo-3D: a 3x3 convolution over each
frame, then a convolution over time at each pixel that starts as the identity, so an image (a 4-D tensor, or one
frame) passes through the spatial layers alone. The features stay at the low resolution and turn into the
high-resolution residual by depth-to-space (ESPCN), which keeps the network cheap.

It trains on pairs it cuts from the clips it is given: a random square of each clip (crop) is the target, and
its input is that square area-downsampled (every other frame, for time), blurred by a random amount and
noised by a random amount whose level is an input of the network (Imagen's noise conditioning
augmentation), so that a generator's imperfect videos upsample as cleanly as real ones. Sampling can name a
noise level too: noise is then added to the input. With augment, each training clip is also flipped,
transposed and reversed in time at random, which a small folder of real footage needs (RESULTS.md has the
figures).

References:
- Make-A-Video: https://arxiv.org/abs/2209.14792        - Imagen Video: https://arxiv.org/abs/2210.02303
- ESPCN, depth-to-space: https://arxiv.org/abs/1609.05158  - EDSR, residual blocks: https://arxiv.org/abs/1707.02921
- Noise conditioning augmentation (cascaded diffusion): https://arxiv.org/abs/2106.15282

Shapes: B batch, C channels, T frames, H W height width (output), h w the input's.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def space_conv(cin: int, cout: int) -> nn.Conv3d:
    """A 3x3 convolution over each frame of (B, C, T, H, W)."""
    return nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1))


class TimeConv(nn.Module):
    """A convolution over time at each pixel, the identity at initialisation (Make-A-Video); skipped for images."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))
        nn.init.dirac_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):  # (B, C, T, H, W)
        return x if x.shape[2] == 1 else self.conv(x)


class Block(nn.Module):
    """Pseudo-3D residual block without norms (EDSR): conv over space, over time, scale-and-shift by the noise
    level, SiLU, again over space and time. Only the scale-and-shift starts at zero: with the second convolution
    at zero as well, the first learned nothing until the second and the output had grown (RESULTS.md)."""

    def __init__(self, c: int, emb: int, temporal: bool):
        super().__init__()
        self.space1, self.space2 = space_conv(c, c), space_conv(c, c)
        self.time1, self.time2 = (TimeConv(c), TimeConv(c)) if temporal else (nn.Identity(), nn.Identity())
        self.film = nn.Linear(emb, 2 * c)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x, emb):  # x (B, C, T, h, w), emb (B, E)
        scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, 1)  # 2 x (B, C, 1, 1, 1)
        h = F.silu(self.time1(self.space1(x)) * (1 + scale) + shift)
        return x + self.time2(self.space2(h))


def blur(x, sigma: float):
    """A separable Gaussian blur of sigma pixels over each frame of (B, C, T, H, W), reflecting at the edges."""
    r = max(1, math.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32, device=x.device) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    B, C, T, H, W = x.shape
    y = F.pad(x.reshape(B * C * T, 1, H, W), (r, r, r, r), mode='reflect')  # (B*C*T, 1, H + 2r, W + 2r)
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.view(B, C, T, H, W)



def crossfade(lo):
    """Frame interpolation without a model: (B, C, t, h, w) -> (B, C, 2t - 1, h, w), every other frame lo's and
    those between the mean of their neighbours."""
    mid = (lo[:, :, 1:] + lo[:, :, :-1]) / 2  # (B, C, t - 1, h, w)
    x = torch.stack([lo[:, :, :-1], mid], 3).flatten(2, 3)  # (B, C, 2t - 2, h, w): given, between, ...
    return torch.cat([x, lo[:, :, -1:]], 2)


def bicubic(x, s: int):
    """Bicubic upsampling by s of each frame of (B, C, T, h, w)."""
    B, C, T, h, w = x.shape
    up = F.interpolate(x.transpose(1, 2).reshape(B * T, C, h, w), scale_factor=s, mode='bicubic', align_corners=False)
    return up.view(B, T, C, h * s, w * s).transpose(1, 2)


@dataclass
class SuperResConfig:
    scale: int = 2  # upsampling in space: 1 (none), 2 or 4
    scale_t: int = 1  # upsampling in time: 1 (none) or 2 (given every other frame, the frames between)
    channels: int = 32  # width of the blocks
    n_blocks: int = 4  # pseudo-3D residual blocks
    temporal: bool = True  # the blocks' convolutions over time (off: each frame alone)
    blur: float = 0.5  # training: the input is blurred by a random share of this sigma (input pixels); 0 suits
    #                    clean footage, 0.5 the priors' softer videos (RESULTS.md)
    noise: float = 0.1  # training: the input is noised by a random std up to this, its level an input
    loss: str = 'l2'  # l1 or l2 regression loss against the real clip (l2: +4 dB on shapes, l1 better on footage)
    augment: bool = False  # training: each clip flipped, transposed, reversed in time at random (for a small folder)
    crop: int = 32  # training: a random square of this many output pixels from each clip (0: the whole frame). The
    #                 network is convolutional, so crops teach it as well for less: 1200 steps on 32x32 crops of
    #                 64x64 clips upsample as well as 800 on whole ones, in 0.4x the time (RESULTS.md)
    # the training recipe (train.py's defaults for super-resolution; a resumed run may change lr, batch_size,
    # max_iters, ema)
    resolution: int = 0  # train on clips of this square size, the output's (0 = the data's); the input is / scale
    optimizer: str = 'adamw'  # adamw (the only choice)
    lr: float = 2e-3  # peak learning rate (3e-3 spiked at the end of warmup in one run of three: RESULTS.md)
    weight_decay: float = 0.0  # on convolution and linear weights
    betas: tuple = (0.9, 0.99)  # AdamW's betas
    batch_size: int = 8  # clips per micro-step per process
    max_iters: int = 1200  # optimizer steps in total
    ema: float = 0.0  # decay of a weight copy that evaluation and sampling use (0 = none)


class SuperRes(nn.Module):
    reads = 'pixels'  # forward's x: high-resolution clips (B, 3, T, H, W); the model makes its own input
    kind = 'upsampler'  # sample() upsamples the low-resolution video it is given

    def __init__(self, config: SuperResConfig):
        super().__init__()
        c = config
        if c.scale not in (1, 2, 4) or c.scale_t not in (1, 2) or c.scale * c.scale_t == 1:
            raise ValueError(f'scale must be 1, 2 or 4 and scale_t 1 or 2, not both 1; got scale {c.scale}, '
                             f'scale_t {c.scale_t}')
        if c.loss not in ('l1', 'l2'):
            raise ValueError(f"loss must be 'l1' or 'l2', got {c.loss!r}")
        if c.optimizer != 'adamw':
            raise ValueError(f"super-resolution trains with optimizer 'adamw', got {c.optimizer!r}")
        if c.blur < 0 or c.noise < 0:
            raise ValueError(f'blur {c.blur} and noise {c.noise} are the largest degradations: at least 0')
        if c.crop and (c.crop < 4 * c.scale or c.crop % c.scale):
            raise ValueError(f'crop {c.crop} must be 0 (whole frames) or a multiple of scale {c.scale} of at least '
                             f'{4 * c.scale}')
        self.config = c
        emb = 64
        self.register_buffer('freqs', torch.exp(torch.linspace(0, math.log(1000), emb // 2)), persistent=False)
        self.noise_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = space_conv(3 + (c.scale_t > 1), c.channels)  # + the mask of given frames, for time
        self.blocks = nn.ModuleList(Block(c.channels, emb, c.temporal) for _ in range(c.n_blocks))
        self.conv_out = space_conv(c.channels, 3 * c.scale ** 2)
        nn.init.zeros_(self.conv_out.weight)  # at initialisation the model is its fixed upsample
        nn.init.zeros_(self.conv_out.bias)
        self.last_losses = {}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, use_ema: bool = True) -> 'SuperRes':
        """The model a train.py checkpoint holds, with its EMA weights where the run kept them."""
        model = cls(SuperResConfig(**{'crop': 0, **ckpt['config']}))  # checkpoints before crop trained on whole frames
        model.load_state_dict(ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model'])
        return model

    def init_from_data(self, x, text=None):
        """Check that clips of the data fit: the model needs none of their statistics."""
        self.check_target(x)

    def check_target(self, x):
        c = self.config
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f'expected clips (B, 3, T, H, W), got {tuple(x.shape)}')
        if x.shape[3] % c.scale or x.shape[4] % c.scale or x.shape[3] < 4 * c.scale:
            raise ValueError(f'the clips are {x.shape[3]}x{x.shape[4]}: train at a size that divides by --scale '
                             f'{c.scale} and is at least {4 * c.scale} (--resolution)')
        if c.scale_t > 1 and x.shape[2] % 2 == 0:
            raise ValueError(f'frame interpolation trains on clips of 2k + 1 frames (every other one given), '
                             f'got {x.shape[2]}')

    def embed(self, level):
        """Fourier features of the noise level (B,) -> (B, E)."""
        angles = level.float()[:, None] * self.freqs  # (B, E/2)
        return self.noise_mlp(torch.cat([angles.sin(), angles.cos()], 1))

    def net(self, lo, level, keep=None):
        """The upsampling of lo (B, 3, t, h, w) at noise level (B,): its fixed upsample (every other output frame
        lo's and those between their mean, for scale_t 2; then bicubic, for scale > 1) plus the network's
        residual. keep (B, 3, t, h, w): frames that come out exactly (time alone: the clean given frames)."""
        c = self.config
        x = crossfade(lo) if c.scale_t > 1 else lo  # (B, 3, T, h, w)
        if c.scale_t > 1:
            given = (torch.arange(x.shape[2], device=x.device) % 2 == 0).to(x.dtype)  # (T,)
            x_in = torch.cat([x, given.view(1, 1, -1, 1, 1).expand(x.shape[0], 1, -1, *x.shape[3:])], 1)
        else:
            x_in = x
        h = self.conv_in(x_in)
        emb = self.embed(level)
        for block in self.blocks:
            h = block(h, emb)
        r = self.conv_out(h)  # (B, 3*s*s, T, h, w)
        B, _, T, hh, ww = r.shape
        s = c.scale
        r = r.view(B, 3, s, s, T, hh, ww).permute(0, 1, 4, 5, 2, 6, 3)  # (B, 3, T, h, s, w, s): depth to space
        r = r.reshape(B, 3, T, hh * s, ww * s)
        x = bicubic(x, s) if s > 1 else x
        out = x + r
        if keep is not None and c.scale == 1 and c.scale_t > 1:
            out = out.clone()
            out[:, :, ::2] = keep.to(out.dtype)
        return out

    def forward(self, x, text=None, step: int = 0):
        """x (B, 3, T, H, W): real clips. The model makes their degraded low-resolution input itself and
        returns (its upsampling, the loss against x in fp32). text is not read."""
        c = self.config
        self.check_target(x)
        B = x.shape[0]
        if self.training and 0 < c.crop < max(x.shape[3:]):  # each clip its own square; evaluation sees whole frames
            rows, cols = (torch.randint(max(1, n - c.crop + 1), (B, 1), device=x.device)
                          + torch.arange(min(n, c.crop), device=x.device) for n in x.shape[3:])  # (B, crop) each
            x = x[torch.arange(B, device=x.device)[:, None, None], :, :, rows[:, :, None], cols[:, None, :]]
            x = x.permute(0, 3, 4, 1, 2)  # (B, crop, crop, 3, T) -> (B, 3, T, crop, crop)
        if c.augment:  # 16 variants of each clip: flips in x, y and time, and for square frames a transpose
            for dims in ((-1,), (-2,), (2,)) + (((-1, -2),) if x.shape[3] == x.shape[4] else ()):
                turn = torch.rand(B, device=x.device) < 0.5
                flipped = x.transpose(-1, -2) if len(dims) == 2 else x.flip(dims)
                x = torch.where(turn[:, None, None, None, None], flipped, x)
        lo = F.avg_pool3d(x, (1, c.scale, c.scale)) if c.scale > 1 else x  # (B, 3, T, h, w)
        if c.scale_t > 1:
            lo = lo[:, :, ::2]  # every other frame given
        clean = lo
        if c.blur > 0:  # each clip blurred by its own share of the largest blur
            share = torch.rand(B, 1, 1, 1, 1, device=x.device, dtype=lo.dtype)
            lo = lo + share * (blur(lo, c.blur) - lo)
        level = torch.rand(B, device=x.device) * c.noise
        lo = lo + level.to(lo.dtype)[:, None, None, None, None] * torch.randn_like(lo)
        out = self.net(lo, level, keep=clean)
        err = out.float() - x.float()
        loss = err.abs().mean() if c.loss == 'l1' else err.pow(2).mean()
        return out, loss

    def configure_optimizers(self, device_type: str) -> list:
        """[AdamW]; weight decay on convolution and linear weights only."""
        c = self.config
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': c.weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return [torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, fused=device_type in ('cuda', 'cpu'))]

    @torch.no_grad()
    def sample(self, text, x, generator: torch.Generator | None = None, noise: float = 0.0):
        """Upsample x (B, 3, t, h, w) or an image (B, 3, h, w) in [-1, 1] to (B, 3, T, h * scale, w * scale),
        T = 2t - 1 with scale_t 2, clamped to [-1, 1]. noise: a level of Gaussian noise added to x first
        and told to the network (noise conditioning augmentation; 0 = none). text is not read. The network
        is convolutional: any size and length works."""
        c = self.config
        image = x.ndim == 4
        if image:
            x = x.unsqueeze(2)  # (B, 3, 1, h, w)
        if x.ndim != 5 or x.shape[1] != 3 or min(x.shape[3:]) < 4:
            raise ValueError(f'expected a video (B, 3, T, H, W) or an image (B, 3, H, W) of at least 4x4 pixels, '
                             f'got {tuple(x.shape)}')
        if c.scale_t > 1 and x.shape[2] < 2:
            raise ValueError(f'frame interpolation needs at least 2 frames, got {x.shape[2]}')
        if noise < 0:
            raise ValueError(f'noise must be >= 0, got {noise}')
        level = torch.full((x.shape[0],), float(noise), device=x.device)
        lo = x
        if noise > 0:
            lo = x + noise * torch.randn(x.shape, generator=generator, device=x.device).to(x.dtype)
        out = self.net(lo, level, keep=x).clamp(-1, 1)
        return out.squeeze(2) if image and out.shape[2] == 1 else out
