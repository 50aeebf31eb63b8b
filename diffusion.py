"""
Text-to-video diffusion with a pseudo-3D UNet (Make-A-Video), in pixels or in a video tokenizer's latent space.

The network is a UNet whose every layer is an image layer followed by a video one: a 3x3 convolution over each
frame, then a convolution over time at each pixel that starts as the identity (Dirac); at the low resolutions,
self-attention over each frame's positions, cross-attention to the text, then attention over time at each
position whose output projection starts at zero. So at initialisation the video network is the image network
applied frame by frame, and an image (a 4-D (B, C, H, W) batch, or one frame) skips every temporal layer:
Make-A-Video's recipe of training on images first and fine-tuning on clips is two train.py runs
(--image_pretrain, then --init_from). In pixels the low levels also halve the frames (time_down, SpaceTimeUnet's
temporal compression): a strided convolution over time that starts as keeping every other frame, and frames
repeated on the way up; there the video network starts as the image network on those frames.

Noise: continuous time t in [0, 1], a cosine log-SNR schedule, z_t = alpha_t x + sigma_t eps with
alpha^2 + sigma^2 = 1, and the network predicts v = alpha eps - sigma x (v-prediction). Clips of pixels train and
sample at more noise (noise_shift, simple diffusion's shifted schedule for inputs of many values; images keep the
plain one). The text goes through a small transformer trained with the model, read by cross-attention and,
pooled, added to the time embedding; it is dropped with probability cfg_drop in training for classifier-free
guidance.

Masked-frame conditioning (FDM, Make-A-Video's interpolation): the network also reads a per-frame mask and the
known frames. Training mixes plain text to video with given first frames (image to video, continuation) and given
first and last frames (interpolation); sampling keeps given frames exactly, which also gives the sliding window.

Samplers: DDIM (with eta) and DPM-Solver++(2M), guidance batched into one forward pass.

The interface every model file shares (train.py, sample.py, eval.py and bench.py use nothing else):
DiffusionConfig (its defaults are the CPU recipe), forward(x, text, step) -> (v prediction, loss),
configure_optimizers(device_type) -> [optimizers], sample(text, x=None, generator=None, **settings),
Diffusion.from_checkpoint(ckpt), and the attributes `reads` ('latents' or 'pixels', from config.space) and `kind`.

References:
- Make-A-Video: https://arxiv.org/abs/2209.14792          - Video Diffusion Models: https://arxiv.org/abs/2204.03458
- DDPM: https://arxiv.org/abs/2006.11239                  - DDIM: https://arxiv.org/abs/2010.02502
- v-prediction (progressive distillation): https://arxiv.org/abs/2202.00512
- Cosine schedule: https://arxiv.org/abs/2102.09672; in log-SNR form, simple diffusion: https://arxiv.org/abs/2301.11093
- DPM-Solver++: https://arxiv.org/abs/2211.01095           - Classifier-free guidance: https://arxiv.org/abs/2207.12598
- Flexible Diffusion Models (masked frames): https://arxiv.org/abs/2205.11495
- Latent diffusion: https://arxiv.org/abs/2112.10752

Shapes: B batch, C channels, T frames, H W height width, L text tokens, D text width, E embedding width.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLING = dict(sampler='dpm', steps=16, cfg=4.0, eta=0.0)  # chosen by caption accuracy on shapes (RESULTS.md)
PIXEL_SHIFT = -3.0  # log-SNR shift of pixel clips: invalid videos 40 -> 12 % at equal steps (RESULTS.md)
LOGSNR_MIN, LOGSNR_MAX = -15.0, 15.0  # the schedule's ends: t = 1 is pure noise to float precision, t = 0 clean
ANGLES = math.atan(math.exp(-0.5 * LOGSNR_MAX)), math.atan(math.exp(-0.5 * LOGSNR_MIN))  # atan(sigma / alpha) there


def logsnr_of(t):
    """The cosine schedule as log-SNR, t in [0, 1] -> [LOGSNR_MAX, LOGSNR_MIN] (alpha = cos, sigma = sin of an
    angle that grows linearly with t, clipped at the ends)."""
    lo, hi = ANGLES
    return -2 * torch.log(torch.tan(lo + t * (hi - lo)))


def shift_times(t, shift: float):
    """The times at which the cosine schedule's log-SNR is shift higher than at t (simple diffusion's shifted
    schedule, as a warp of time): training draws these times and sampling steps through them, so shift < 0 spends
    them at more noise, and the network's time input keeps its meaning for any shift."""
    if shift == 0:
        return t
    lo, hi = ANGLES
    angle = torch.atan(torch.tan(lo + t * (hi - lo)) * math.exp(-0.5 * shift)).clamp(lo, hi)
    return (angle - lo) / (hi - lo)


def alpha_sigma(logsnr):
    """Signal and noise scales of a log-SNR: alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def attend(q, k, v, heads: int):
    """Multi-head attention of q (N, Lq, C) over k, v (N, Lk, C): one SDPA call, no mask (flash on GPU); in
    bfloat16 on CPU a plain matmul-softmax-matmul, as PyTorch's CPU flash backward is 5-10x slower at these
    sizes (RESULTS.md)."""
    N, Lq, C = q.shape
    q, k, v = (a.view(N, a.shape[1], heads, C // heads).transpose(1, 2) for a in (q, k, v))  # (N, h, L, C/h)
    if q.device.type == 'cpu' and q.dtype == torch.bfloat16:
        y = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v  # softmax sums in float32 inside
    else:
        y = F.scaled_dot_product_attention(q, k, v)
    return y.transpose(1, 2).reshape(N, Lq, C)


def sinusoid(x, dim: int):
    """Sinusoidal features (..., dim) of positions or times x (...)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=x.device) / (dim // 2))
    angles = x.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class FrameNorm(nn.Module):
    """GroupNorm over each frame of (B, C, T, H, W) on its own, so that a video's frames normalise as images do."""

    def __init__(self, c: int, groups: int = 32):
        super().__init__()
        self.groups = math.gcd(groups, c)
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):  # (B, C, T, H, W)
        B, C, T, H, W = x.shape
        h = x.transpose(1, 2).reshape(B * T, C, H, W)  # the frames as images: a view in channels-last memory
        h = F.group_norm(h.float(), self.groups, self.weight, self.bias, 1e-5).to(x.dtype)
        return h.view(B, T, C, H, W).transpose(1, 2)


def space_conv(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    """A 3x3 convolution over each frame of (B, C, T, H, W)."""
    return nn.Conv3d(cin, cout, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1))


class PseudoConv3d(nn.Module):
    """A 3x3 convolution over space, then a 3-tap convolution over time that starts as the identity and is
    skipped for images (one frame)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.space = space_conv(cin, cout)
        self.time = nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0))
        nn.init.dirac_(self.time.weight)
        nn.init.zeros_(self.time.bias)

    def forward(self, x):  # (B, C, T, H, W)
        x = self.space(x)
        return x if x.shape[2] == 1 else self.time(x)


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 convolution, then T with a strided 3-tap convolution over time that starts
    as keeping every other frame (T -> ceil(T / 2)); images keep their one frame. SpaceTimeUnet's temporal
    compression: the low levels of a UNet of clips run on fewer frames."""

    def __init__(self, c: int):
        super().__init__()
        self.space = space_conv(c, c, stride=2)
        self.time = nn.Conv3d(c, c, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
        nn.init.dirac_(self.time.weight)
        nn.init.zeros_(self.time.bias)

    def forward(self, x):  # (B, C, T, H, W) -> (B, C, ceil(T / 2), H / 2, W / 2)
        x = self.space(x)
        return x if x.shape[2] == 1 else self.time(x)


class ResBlock(nn.Module):
    """norm, SiLU, pseudo-3D conv, norm scaled and shifted by the time (and pooled text) embedding, SiLU, pseudo-3D
    conv whose spatial part starts at zero: a block starts as its skip connection."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(cin), PseudoConv3d(cin, cout)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm2, self.conv2 = FrameNorm(cout), PseudoConv3d(cout, cout)
        self.dropout = dropout
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.space.weight)
        nn.init.zeros_(self.conv2.space.bias)

    def forward(self, x, emb):  # x (B, C, T, H, W), emb (B, E)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, 1)  # 2 x (B, C, 1, 1, 1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(F.dropout(h, self.dropout, self.training))
        return self.skip(x) + h


class SpaceTimeAttention(nn.Module):
    """Self-attention over each frame's positions, cross-attention to the text, then self-attention over time at
    each position (frame positions added to its input; output projection zero at init; skipped for images)."""

    def __init__(self, c: int, heads: int, text_dim: int):
        super().__init__()
        self.heads = heads
        self.norm_s, self.qkv_s, self.proj_s = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.norm_x, self.q_x, self.kv_x, self.proj_x = nn.LayerNorm(c), nn.Linear(c, c), nn.Linear(text_dim, 2 * c), \
            nn.Linear(c, c)
        self.norm_t, self.qkv_t, self.proj_t = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)
        nn.init.zeros_(self.proj_t.weight)
        nn.init.zeros_(self.proj_t.bias)

    def forward(self, x, text):  # x (B, C, T, H, W), text (B, L, D)
        B, C, T, H, W = x.shape
        h = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)  # (B*T, HW, C): each frame's positions
        h = h + self.proj_s(attend(*self.qkv_s(self.norm_s(h)).chunk(3, -1), self.heads))
        k, v = self.kv_x(text).repeat_interleave(T, 0).chunk(2, -1)  # 2 x (B*T, L, C)
        h = h + self.proj_x(attend(self.q_x(self.norm_x(h)), k, v, self.heads))
        if T > 1:
            ht = h.view(B, T, H * W, C).transpose(1, 2).reshape(B * H * W, T, C)  # (B*HW, T, C): each position
            pos = sinusoid(torch.arange(T, device=x.device), C).to(ht.dtype)  # (T, C): which frame
            q, k, v = self.qkv_t(self.norm_t(ht) + pos).chunk(3, -1)
            ht = ht + self.proj_t(attend(q, k, v, self.heads))
            h = ht.view(B, H * W, T, C).transpose(1, 2).contiguous()  # (B, T, HW, C): channels-last when permuted
        return h.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)


class TextBlock(nn.Module):
    """A pre-norm bidirectional transformer block over the caption's tokens."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):  # (B, L, D)
        x = x + self.proj(attend(*self.qkv(self.norm1(x)).chunk(3, -1), self.heads))
        return x + self.mlp(self.norm2(x))


@dataclass
class DiffusionConfig:
    space: str = 'latent'  # latent (the tokenizer's latents, --tokenizer) or pixel (the clips themselves)
    in_channels: int = 0  # channels diffused (train.py sets it from the data: the tokenizer's latent width, or 3)
    grid: tuple = ()  # (frames, height, width) of one diffused clip (train.py sets it from the data)
    text_vocab: int = 512  # text ids are below this (train.py sets the text fields from the data)
    text_len: int = 16  # text tokens per caption
    pad_id: int = 0  # the text pad id; a caption of pads only is the unconditional prompt
    channels: int = 0  # width of the first UNet level (0: by space, 64 for latents, 32 for pixels)
    ch_mult: tuple = ()  # width of each level as a multiple of channels; each level after the first halves H, W
    #                      (empty: by space, (1, 2) for 8x8 latents, (1, 2, 4, 4) for 32x32 pixels)
    num_res_blocks: int = 1  # residual blocks per level (the way up has one more)
    time_down: int = -1  # the last this many downsamplings also halve the frames (SpaceTimeUnet's temporal
    #                      compression: 1.45x faster pixel steps, RESULTS.md); -1: by space, all of them for
    #                      pixels, none for latents (5 frames); 0: every level sees all frames
    noise_shift: float = math.nan  # log-SNR shift of the clips' noise schedule (simple diffusion's): < 0 trains and
    #                              samples at more noise; nan: by space, 0 for latents, -3 for pixels (PIXEL_SHIFT)
    attn_res: int = 8  # spatial, text and temporal attention at the levels this size or smaller
    head_dim: int = 32  # attention head width
    text_dim: int = 128  # width of the text transformer
    text_layers: int = 2  # its blocks
    dropout: float = 0.0  # in the residual blocks
    cfg_drop: float = 0.1  # probability of training on the unconditional prompt (for guidance)
    cond_prob: float = 0.3  # share of training clips with given frames (first 1, first k, or first and last)
    image_pretrain: bool = False  # train on one random frame of each clip, as an image (Make-A-Video's first
    #                               stage; a batch is batch_size images, so raise it)
    # the training recipe (train.py's defaults; a resumed run may change lr, batch_size, max_iters, ema)
    resolution: int = 32  # the clips' square size, which must be the tokenizer's for latents (0 = the data's)
    optimizer: str = 'adamw'  # adamw (the only choice)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # on convolution and linear weights
    betas: tuple = (0.9, 0.99)  # AdamW's betas
    batch_size: int = 0  # clips per micro-step per process (0: by space: 32 for latents, whose captions read 0.96
    #                      right where 16 read 0.91-0.92, RESULTS.md; 8 for pixels)
    max_iters: int = 2000  # optimizer steps in total (1200 at lr 2e-3 drew the motion at random: RESULTS.md)
    ema: float = 0.995  # decay of the weight copy that evaluation and sampling use (0 = none)

    def __post_init__(self):  # the defaults that depend on the space
        latent = self.space == 'latent'
        self.channels = self.channels or (64 if latent else 32)
        self.ch_mult = tuple(self.ch_mult) or ((1, 2) if latent else (1, 2, 4, 4))
        self.time_down = (0 if latent else len(self.ch_mult) - 1) if self.time_down == -1 else self.time_down
        self.noise_shift = (0.0 if latent else PIXEL_SHIFT) if math.isnan(self.noise_shift) else self.noise_shift
        self.batch_size = self.batch_size or (32 if latent else 8)

    @property
    def reads(self) -> str:
        return 'latents' if self.space == 'latent' else 'pixels'


class Diffusion(nn.Module):
    reads = 'latents'  # forward's x: the tokenizer's latents (B, d, t, h, w), or clips (B, 3, T, H, W): config.space
    kind = 'generator'  # sample() makes videos from text

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        c = config
        if c.space not in ('latent', 'pixel'):
            raise ValueError(f"space must be 'latent' or 'pixel', got {c.space!r}")
        if c.in_channels < 1 or len(c.grid) != 3:
            raise ValueError(f'in_channels and grid (frames, height, width) come from the data, got {c.in_channels} '
                             f'and {c.grid}')
        down = 2 ** (len(c.ch_mult) - 1)
        if c.grid[1] % down or c.grid[2] % down:
            raise ValueError(f'the {c.grid[1]}x{c.grid[2]} {c.space} clips must divide by {down} for the '
                             f'{len(c.ch_mult)} levels of ch_mult {c.ch_mult}')
        if not 0 <= c.time_down < len(c.ch_mult):
            raise ValueError(f'time_down counts downsamplings that halve the frames: 0 to {len(c.ch_mult) - 1} '
                             f'for the {len(c.ch_mult)} levels of ch_mult {c.ch_mult}, or -1 (by space); got '
                             f'{c.time_down}')
        widths = [c.channels * m for m in c.ch_mult]
        if any(w % c.head_dim for w in widths) or c.text_dim % c.head_dim:
            raise ValueError(f'the level widths {widths} and text_dim {c.text_dim} must divide by head_dim '
                             f'{c.head_dim}')
        if not 0 <= c.cond_prob <= 1 or not 0 <= c.cfg_drop <= 1:
            raise ValueError('cond_prob and cfg_drop are probabilities: between 0 and 1')
        if not math.isfinite(c.noise_shift):
            raise ValueError(f'noise_shift is a log-SNR shift, a finite number such as -3 (or nan: by space), got '
                             f'{c.noise_shift}')
        if c.optimizer != 'adamw':
            raise ValueError(f"diffusion trains with optimizer 'adamw', got {c.optimizer!r}")
        self.config = c
        self.reads = c.reads
        emb = 4 * c.channels
        self.register_buffer('scale', torch.ones(()))  # data * scale has unit variance (set from the data)
        self.text_emb = nn.Embedding(c.text_vocab, c.text_dim)
        self.text_pos = nn.Parameter(torch.zeros(c.text_len, c.text_dim))
        self.text_blocks = nn.ModuleList(TextBlock(c.text_dim, c.text_dim // c.head_dim) for _ in range(c.text_layers))
        self.text_norm = nn.LayerNorm(c.text_dim)
        self.time_mlp = nn.Sequential(nn.Linear(c.channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_pool = nn.Linear(c.text_dim, emb)
        # the UNet: conv_in reads the noisy clip, the known frames and their mask
        self.conv_in = space_conv(2 * c.in_channels + 1, widths[0])
        self.down, self.up, skips, ch, res = nn.ModuleList(), nn.ModuleList(), [widths[0]], widths[0], c.grid[1]
        for i, w in enumerate(widths):
            for _ in range(c.num_res_blocks):
                self.down.append(self.layer(ch, w, res, emb))
                ch = w
                skips.append(ch)
            if i < len(widths) - 1:
                time = i >= len(widths) - 1 - c.time_down
                self.down.append(Downsample(ch) if time else space_conv(ch, ch, stride=2))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb, c.dropout), SpaceTimeAttention(ch, ch // c.head_dim,
                                                                                        c.text_dim),
                                  ResBlock(ch, ch, emb, c.dropout)])
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(self.layer(ch + skips.pop(), w, res, emb))
                ch = w
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=(1, 2, 2), mode='nearest'), space_conv(ch, ch)))
                res *= 2
        self.norm_out, self.conv_out = FrameNorm(ch), space_conv(ch, c.in_channels)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.last_losses = {}  # parts of the loss for train.py's log (none here)

    def layer(self, cin: int, cout: int, res: int, emb: int) -> nn.ModuleList:
        """One step of a level: a residual block, and attention at the low resolutions."""
        c = self.config
        attn = [SpaceTimeAttention(cout, cout // c.head_dim, c.text_dim)] if res <= c.attn_res else []
        return nn.ModuleList([ResBlock(cin, cout, emb, c.dropout), *attn])

    @classmethod
    def from_checkpoint(cls, ckpt: dict, use_ema: bool = True) -> 'Diffusion':
        """The model a train.py checkpoint holds, with its EMA weights where the run kept them."""
        model = cls(DiffusionConfig(**{'time_down': 0, 'noise_shift': 0.0, **ckpt['config']}))  # as before these
        model.load_state_dict(ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model'])
        return model

    def check(self, x, text):
        c = self.config
        if text is None or text.ndim != 2 or text.shape[1] != c.text_len:
            raise ValueError(f'text must be (B, {c.text_len}) ids, got {None if text is None else tuple(text.shape)}')
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.ndim != 5 or x.shape[1] != c.in_channels or tuple(x.shape[3:]) != tuple(c.grid[1:]):
            raise ValueError(f'expected {c.space} clips (B, {c.in_channels}, T, {c.grid[1]}, {c.grid[2]}) or images '
                             f'(B, {c.in_channels}, {c.grid[1]}, {c.grid[2]}), got {tuple(x.shape)}')

    @torch.no_grad()
    def init_from_data(self, x, text):
        """Check that a batch of the data fits, and scale latents to unit variance (latent diffusion's scale
        factor; pixels in [-1, 1] keep theirs). The scale is a buffer: checkpoints carry it."""
        self.check(x, text)
        if self.config.space == 'latent':
            self.scale.fill_(1 / x.float().std().clamp_min(1e-3).item())

    # -------------------------------------------------------------------------
    # the network

    def encode_text(self, text):
        """(B, L) ids -> (tokens (B, L, D), pooled (B, D))."""
        h = self.text_emb(text) + self.text_pos[:text.shape[1]]
        for block in self.text_blocks:
            h = block(h)
        h = self.text_norm(h)
        return h, h.mean(1)

    def net(self, z, t, text, known, mask):
        """v prediction (B, C, T, H, W) for the noisy clip z at times t (B,), the text as encode_text gives it
        (encoded once per sampled clip, not per step), known frames (B, C, T, H, W) (zero where not known) and
        their mask (B, 1, T, 1, 1)."""
        tokens, pooled = text
        emb = self.time_mlp(sinusoid(t * 1000, self.config.channels).to(z.dtype)) + self.text_pool(pooled)
        B, C, T, H, W = z.shape
        h = self.conv_in(torch.cat([z, known * mask, mask.expand(B, 1, T, H, W)], 1))
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, (nn.Conv3d, Downsample)) else self.run_layer(layer, h, emb, tokens)
            hs.append(h)
        h = self.run_layer(self.mid, h, emb, tokens)
        for layer in self.up:
            if isinstance(layer, nn.Sequential):  # up a level; frames repeated back to the skip's where time_down
                frames = hs[-1].shape[2]          # halved them
                h = layer(h if h.shape[2] == frames else h.repeat_interleave(2, 2)[:, :, :frames])
            else:
                h = self.run_layer(layer, torch.cat([h, hs.pop()], 1), emb, tokens)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def run_layer(layer, h, emb, tokens):
        for m in layer:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h, tokens)
        return h

    # -------------------------------------------------------------------------
    # training

    def frame_mask(self, B: int, T: int, device) -> torch.Tensor:
        """(B, 1, T, 1, 1) float: 1 on the frames given to the network. A cond_prob share of the clips gets, in
        equal parts: the first frame (image to video), the first k < T frames (continuation), the first and last
        frames (interpolation); the rest none (text to video)."""
        if T == 1:
            return torch.zeros(B, 1, 1, 1, 1, device=device)
        kind = torch.randint(3, (B, 1), device=device)
        k = torch.where(kind == 1, torch.randint(1, T, (B, 1), device=device), 1)  # (B, 1) first frames given
        frame = torch.arange(T, device=device)
        given = (frame < k) | ((kind == 2) & (frame == T - 1))
        given &= torch.rand(B, 1, device=device) < self.config.cond_prob
        return given.float().view(B, 1, T, 1, 1)

    def forward(self, x, text, step: int = 0):
        """x (B, C, T, H, W) clips (pixels or latents, in the data's units) or images (B, C, H, W), text (B, L)
        ids -> (v prediction, v-MSE in fp32 over the frames not given)."""
        self.check(x, text)
        c = self.config
        if x.ndim == 4:
            x = x.unsqueeze(2)  # (B, C, 1, H, W): an image is a one-frame video
        if c.image_pretrain and x.shape[2] > 1:  # one random frame of each clip, as an image with the clip's
            B, T = x.shape[0], x.shape[2]         # caption (all 17 frames of fewer clips drew worse: RESULTS.md)
            frame = torch.randint(T, (B,), device=x.device)
            x = x[torch.arange(B, device=x.device), :, frame].unsqueeze(2)  # (B, C, 1, H, W)
        B, C, T, H, W = x.shape
        x0 = x.float() * self.scale
        if self.training:  # the unconditional prompt with probability cfg_drop, for guidance
            drop = torch.rand(B, 1, device=text.device) < c.cfg_drop
            text = torch.where(drop, torch.full_like(text, c.pad_id), text)
        t = (torch.rand(1, device=x.device) + torch.arange(B, device=x.device) / B) % 1  # stratified times
        t = shift_times(t, c.noise_shift if T > 1 else 0.0)  # an image shows its content through less noise
        alpha, sigma = (a.view(B, 1, 1, 1, 1) for a in alpha_sigma(logsnr_of(t)))
        eps = torch.randn_like(x0)
        z = alpha * x0 + sigma * eps
        mask = self.frame_mask(B, T, x.device)
        v = self.net(z.to(x.dtype), t, self.encode_text(text), x0.to(x.dtype), mask.to(x.dtype))
        err = (v.float() - (alpha * eps - sigma * x0)).pow(2) * (1 - mask)
        loss = err.sum() / ((1 - mask).sum() * C * H * W).clamp_min(1)
        return v, loss

    def configure_optimizers(self, device_type: str) -> list:
        """[AdamW]; weight decay on convolution, linear and embedding weights only."""
        c = self.config
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': c.weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return [torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, fused=device_type in ('cuda', 'cpu'))]

    # -------------------------------------------------------------------------
    # sampling

    def settings(self, **kw) -> dict:
        """The sampling settings: SAMPLING with those of kw that are not None, checked."""
        given = {k: v for k, v in kw.items() if v is not None}
        for k in given:
            if k not in SAMPLING:
                raise ValueError(f'{k} is not a sampling setting of a diffusion model: {", ".join(SAMPLING)}')
        s = {**SAMPLING, **given}
        if s['sampler'] not in ('ddim', 'dpm'):
            raise ValueError(f"sampler must be 'ddim' or 'dpm' (DPM-Solver++ 2M), got {s['sampler']!r}")
        if s['steps'] < 1:
            raise ValueError(f"steps must be at least 1, got {s['steps']}")
        if s['eta'] < 0 or (s['eta'] > 0 and s['sampler'] != 'ddim'):
            raise ValueError(f"eta (DDIM's share of fresh noise, >= 0) goes with --sampler ddim, got {s['eta']}")
        return s

    @torch.no_grad()
    def sample(self, text, x=None, generator: torch.Generator | None = None, new_prompt: bool = False,
               last=None, **kw):
        """Clips (B, C, T, H, W), in the data's units, for text (B, L) ids. x (B, C, t0, H, W): the first frames,
        given and kept (image to video, continuation); last (B, C, t1, H, W): the last frames, given and kept
        (interpolation). new_prompt is the priors' (given frames made for another prompt); diffusion reads the
        given frames the same way either way. kw: settings (sampler, steps, cfg, eta)."""
        s = self.settings(**kw)
        c = self.config
        B, (T, H, W), C, dev = text.shape[0], c.grid, c.in_channels, text.device
        known = torch.zeros(B, C, T, H, W, device=dev)
        mask = torch.zeros(B, 1, T, 1, 1, device=dev)
        for given, where in ((x, slice(None, None if x is None else x.shape[2])),
                             (last, slice(None if last is None else T - last.shape[2], None))):
            if given is None:
                continue
            if given.ndim != 5 or given.shape[0] != B or given.shape[1] != C or tuple(given.shape[3:]) != (H, W) \
                    or not 1 <= given.shape[2] <= T:
                raise ValueError(f'given frames must be (B, {C}, 1 .. {T}, {H}, {W}), got {tuple(given.shape)}')
            known[:, :, where] = given.float() * self.scale
            mask[:, :, where] = 1
        n = 1 if s['cfg'] == 1 else 2  # guidance: [conditional ; unconditional] in one batch
        text2 = text if n == 1 else torch.cat([text, torch.full_like(text, c.pad_id)])
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else torch.float32
        ctx = self.encode_text(text2)  # once, not per step
        known2, mask2 = known.repeat(n, 1, 1, 1, 1).to(dtype), mask.repeat(n, 1, 1, 1, 1).to(dtype)

        def denoise(z, t):  # -> the clean clip's prediction x0 (B, C, T, H, W) in fp32, given frames kept
            tt = torch.full((B * n,), float(t), device=dev)
            v = self.net(z.repeat(n, 1, 1, 1, 1).to(dtype), tt, ctx, known2, mask2).float()
            if n == 2:
                cond, uncond = v.chunk(2)
                v = uncond + s['cfg'] * (cond - uncond)
            alpha, sigma = alpha_sigma(logsnr_of(torch.tensor(float(t))))
            x0 = (alpha * z - sigma * v).clamp(-self.scale, self.scale)  # the data lies in [-1, 1] before scaling
            return torch.where(mask > 0, known, x0)

        z = torch.randn(B, C, T, H, W, generator=generator, device=dev)
        return self.solve(denoise, z, s, generator, c.noise_shift) / self.scale

    @staticmethod
    def solve(denoise, z, s: dict, generator=None, shift: float = 0.0):
        """Integrate from t = 1 (z is noise) to t = 0 in s['steps'] steps, uniform in time before the shift's warp
        (shift_times), with DDIM (eta: the share of fresh noise, 0 = deterministic) or DPM-Solver++(2M) (second
        order, in the data prediction), and return the data prediction of the last step."""
        ts = shift_times(torch.linspace(1, 0, s['steps'] + 1), shift)
        prev = None  # DPM-Solver++: the last step's data prediction and its log-SNR step
        for i in range(s['steps']):
            lt, ls = logsnr_of(ts[i]), logsnr_of(ts[i + 1])
            (at, st), (as_, ss) = alpha_sigma(lt), alpha_sigma(ls)
            x0 = denoise(z, ts[i])
            if i == s['steps'] - 1:  # t = 0 is log-SNR 15, not infinity: the last step lands on the prediction itself
                return x0
            if s['sampler'] == 'ddim':
                eps = (z - at * x0) / st
                noise = s['eta'] * ss / st * (1 - (at * ss / (as_ * st)) ** 2).clamp_min(0).sqrt()
                z = as_ * x0 + (ss ** 2 - noise ** 2).clamp_min(0).sqrt() * eps
                if noise > 0:
                    z = z + noise * torch.randn(z.shape, generator=generator, device=z.device)
            else:
                h = (ls - lt) / 2  # the step in lambda = log(alpha / sigma)
                d = x0
                if prev is not None:  # second order after the first step
                    r = prev[1] / h
                    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev[0]
                z = ss / st * z - as_ * torch.expm1(-h) * d
                prev = (x0, h)
