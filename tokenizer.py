"""
A MAGVIT-v2-style causal 3D-convolution video tokenizer with FSQ (or LFQ) quantization.

Video in, a small grid of integer codes out, and back. The convolutions are padded only on the
past side in time, so frame t's latents never see later frames, the first frame is encoded on its
own, 1 + 4k frames map to 1 + k latent frames, and an image (a 4-D tensor) is a one-frame video in
the same code space. Norms take their statistics within a frame, which keeps that causality exact.

References:
- MAGVIT-v2, "Language Model Beats Diffusion: Tokenizer is Key to Visual Generation": https://arxiv.org/abs/2310.05737
- FSQ, "Finite Scalar Quantization: VQ-VAE Made Simple": https://arxiv.org/abs/2309.15505
- VQGAN (adaptive GAN weight, PatchGAN hinge loss): https://arxiv.org/abs/2012.09841
- LeCAM regularisation for GANs with limited data: https://arxiv.org/abs/2104.03310
- R1 zero-centred gradient penalty: https://arxiv.org/abs/1801.04406

Shapes: B batch, C channels, T frames, H W height width; t h w the latent grid, d the latent channels.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

ADAPTIVE_SCALE = 2.0 ** 10  # the GAN's adaptive weight takes gradients of the losses times this (float16)


class RMSNorm(nn.Module):
    """RMS norm over channels at each position (attention's pre-norm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (B, C, T, H, W)
        x = x * torch.rsqrt(x.float().pow(2).mean(1, keepdim=True) + 1e-6).to(x.dtype)
        return x * self.weight.view(1, -1, 1, 1, 1).to(x.dtype)


class FrameGroupNorm(nn.Module):
    """GroupNorm with statistics per frame (over a channel group, H and W): keeps causality in time,
    and unlike a per-position norm keeps how strong a feature is here relative to the rest of the frame
    (per-position norms blow a black background's faint features up to full scale)."""

    def __init__(self, dim: int, groups: int = 8):
        super().__init__()
        self.groups = math.gcd(groups, dim)
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):  # (B, C, T, H, W)
        B, C, T, H, W = x.shape
        xg = x.float().view(B, self.groups, C // self.groups, T, H, W)
        var, mean = torch.var_mean(xg, dim=(2, 4, 5), unbiased=False, keepdim=True)  # per (group, frame)
        x = ((xg - mean) * torch.rsqrt(var + 1e-6)).view(B, C, T, H, W).to(x.dtype)
        return x * self.weight.view(1, -1, 1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1, 1).to(x.dtype)


class CausalConv3d(nn.Module):
    """A 3D convolution padded only on the past side in time (and 'same' in space)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride=(1, 1, 1)):
        super().__init__()
        self.time_pad = kernel - 1
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x):  # (B, C, T, H, W)
        return self.conv(PadPast.apply(x, self.time_pad) if self.time_pad else x)


class PadPast(torch.autograd.Function):
    """n zero frames before x (B, C, T, H, W), whose gradient comes back laid out like x. F.pad's own is a
    strided slice of the convolution's, on which the channels-last SiLU backward before it ran 9x slower:
    the tokenizer's bfloat16 training step is 1.18x as fast with this (RESULTS.md)."""

    @staticmethod
    def forward(ctx, x, n: int):
        ctx.n = n
        ctx.layout = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else \
            torch.contiguous_format
        return F.pad(x, (0, 0, 0, 0, n, 0))

    @staticmethod
    def backward(ctx, grad):
        return grad[:, :, ctx.n:].contiguous(memory_format=ctx.layout), None


def make_norm(dim: int, on: bool) -> nn.Module:
    return FrameGroupNorm(dim) if on else nn.Identity()


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: bool):
        super().__init__()
        self.norm1, self.conv1 = make_norm(cin, norm), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = make_norm(cout, norm), CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Spatial attention within each frame, then causal temporal attention at each position."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.norm_s, self.qkv_s, self.proj_s = RMSNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm_t, self.qkv_t, self.proj_t = RMSNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def attend(self, x, qkv, proj, causal):  # x: (N, L, C)
        N, L, C = x.shape
        q, k, v = qkv(x).view(N, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (N, nh, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return proj(y.transpose(1, 2).reshape(N, L, C))

    def forward(self, x):  # (B, C, T, H, W)
        B, C, T, H, W = x.shape
        h = self.norm_s(x).permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)  # (B*T, H*W, C)
        x = x + self.attend(h, self.qkv_s, self.proj_s, False).view(B, T, H, W, C).permute(0, 4, 1, 2, 3)
        h = self.norm_t(x).permute(0, 3, 4, 2, 1).reshape(B * H * W, T, C)  # (B*H*W, T, C)
        x = x + self.attend(h, self.qkv_t, self.proj_t, True).view(B, H, W, T, C).permute(0, 4, 3, 1, 2)
        return x


def space_to_depth(x, p: int):  # (B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p)
    B, C, T, H, W = x.shape
    x = x.view(B, C, T, H // p, p, W // p, p).permute(0, 1, 4, 6, 2, 3, 5)  # (B, C, p, p, T, H/p, W/p)
    return x.reshape(B, C * p * p, T, H // p, W // p)


def depth_to_space(x, p: int):  # (B, C*p*p, T, h, w) -> (B, C, T, h*p, w*p)
    B, Cpp, T, h, w = x.shape
    x = x.view(B, Cpp // (p * p), p, p, T, h, w).permute(0, 1, 4, 5, 2, 6, 3)  # (B, C, T, h, p, w, p)
    return x.reshape(B, Cpp // (p * p), T, h * p, w * p)


class Upsample(nn.Module):
    """Causal depth-to-space/time: latent frame 0 -> output frame 0, latent frame j > 0 -> frames 2j-1, 2j."""

    def __init__(self, cin: int, cout: int, time: bool, space: bool):
        super().__init__()
        self.ft, self.fs = 2 if time else 1, 2 if space else 1
        self.conv = CausalConv3d(cin, cout * self.ft * self.fs * self.fs)

    def forward(self, x):
        x = self.conv(x)
        B, C, T, H, W = x.shape
        c = C // (self.ft * self.fs * self.fs)
        x = x.view(B, c, self.ft, self.fs, self.fs, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, c, T, ft, H, fs, W, fs)
        x = x.reshape(B, c, T * self.ft, H * self.fs, W * self.fs)
        return x[:, :, self.ft - 1:]  # the first latent frame is one frame, not two


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.ch_mult]
        self.patch = cfg.patch_size
        self.conv_in = CausalConv3d(3 * cfg.patch_size ** 2, widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [ResBlock(cin if j == 0 else w, w, cfg.norm) for j in range(cfg.num_res_blocks)]
            cin = w
            if i < len(widths) - 1:
                stride = (2 if cfg.down_time[i] else 1, 2 if cfg.down_space[i] else 1, 2 if cfg.down_space[i] else 1)
                blocks.append(CausalConv3d(w, widths[i + 1], stride=stride))
                cin = widths[i + 1]
        if cfg.attn:
            blocks.append(Attention(cin, cfg.n_head))
        self.blocks = nn.Sequential(*blocks)
        # always normalised here: unbounded latents saturate FSQ's tanh and the codebook collapses (RESULTS.md)
        self.norm_out, self.conv_out = FrameGroupNorm(cin), CausalConv3d(cin, cfg.latent_dim, kernel=1)

    def forward(self, x):  # (B, 3, T, H, W) -> (B, d, t, h, w)
        x = self.conv_in(space_to_depth(x, self.patch))
        return self.conv_out(F.silu(self.norm_out(self.blocks(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.ch_mult][::-1]
        self.patch = cfg.patch_size
        self.conv_in = CausalConv3d(cfg.latent_dim, widths[0])
        blocks = [Attention(widths[0], cfg.n_head)] if cfg.attn else []
        n = len(widths)
        for i, w in enumerate(widths):
            blocks += [ResBlock(w, w, cfg.norm) for _ in range(cfg.num_res_blocks)]
            if i < n - 1:  # undo the encoder's transitions in reverse order
                blocks.append(Upsample(w, widths[i + 1], cfg.down_time[n - 2 - i], cfg.down_space[n - 2 - i]))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out, self.conv_out = make_norm(widths[-1], cfg.norm), CausalConv3d(widths[-1], 3 * cfg.patch_size ** 2)

    def forward(self, z):  # (B, d, t, h, w) -> (B, 3, T, H, W)
        x = self.blocks(self.conv_in(z))
        return depth_to_space(self.conv_out(F.silu(self.norm_out(x))), self.patch)


class FSQ(nn.Module):
    """Finite scalar quantization: each latent channel is bounded and rounded to one of `levels[i]` values.
    The codebook is implicit: an index is the mixed-radix number of the per-channel digits."""

    def __init__(self, levels):
        super().__init__()
        self.levels = list(levels)
        self.register_buffer('_levels', torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer('_basis', torch.tensor(basis, dtype=torch.long), persistent=False)
        self.codebook_size = math.prod(levels)

    def forward(self, z):  # (B, d, ...) -> quantized codes in [-1, 1], indices (B, ...), no auxiliary loss
        with torch.autocast(z.device.type, enabled=False):  # rounding needs fp32 whatever the autocast
            z = z.float()
            L = self._levels.view(1, -1, *([1] * (z.ndim - 2)))
            half_l = (L - 1) * (1 + 1e-3) / 2
            offset = torch.where(L % 2 == 0, 0.5, 0.0)
            shift = torch.atanh(offset / half_l)
            bounded = torch.tanh(z + shift) * half_l - offset
            rounded = bounded + (bounded.round() - bounded).detach()  # straight-through gradient
            half_w = torch.div(L, 2, rounding_mode='floor')
            codes = rounded / half_w
            digits = (rounded.detach() + half_w).long()  # (B, d, ...) in [0, L)
            idx = (digits * self._basis.view(1, -1, *([1] * (z.ndim - 2)))).sum(1)
        return codes, idx, torch.zeros((), device=z.device)

    def indices_to_codes(self, idx):  # (B, ...) -> (B, d, ...)
        digits = (idx.unsqueeze(1) // self._basis.view(1, -1, *([1] * (idx.ndim - 1)))) % self._levels.long().view(
            1, -1, *([1] * (idx.ndim - 1)))
        half_w = torch.div(self._levels, 2, rounding_mode='floor').view(1, -1, *([1] * (idx.ndim - 1)))
        return (digits.float() - half_w) / half_w


class LFQ(nn.Module):
    """Lookup-free quantization: each latent channel is a bit (its sign); entropy penalty as in MAGVIT-v2."""

    def __init__(self, dim: int, entropy_weight: float, commit_weight: float, temperature: float = 0.1):
        super().__init__()
        if dim > 16:
            raise ValueError(f'lfq_dim {dim} is too large for the exact entropy penalty; use 16 bits or fewer')
        self.dim, self.codebook_size = dim, 2 ** dim
        self.entropy_weight, self.commit_weight, self.temperature = entropy_weight, commit_weight, temperature
        self.register_buffer('_basis', 2 ** torch.arange(dim), persistent=False)
        bits = (torch.arange(2 ** dim)[None, :] // 2 ** torch.arange(dim)[:, None]) % 2
        self.register_buffer('_bits', bits.float(), persistent=False)  # (d, 2^d)

    def forward(self, z):
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            q = torch.where(z > 0, 1.0, -1.0)
            codes = z + (q - z).detach()
            idx = ((q > 0).long() * self._basis.view(1, -1, *([1] * (z.ndim - 2)))).sum(1)
            loss = self.commit_weight * F.mse_loss(z, q)
            if self.training and self.entropy_weight > 0:
                flat = z.movedim(1, -1).reshape(-1, self.dim)  # (N, d)
                lp_pos, lp_neg = F.logsigmoid(4 * flat / self.temperature), F.logsigmoid(-4 * flat / self.temperature)
                per_sample = -(lp_pos.exp() * lp_pos + lp_neg.exp() * lp_neg).sum(1).mean()  # a product of bits
                logp = lp_pos @ self._bits + lp_neg @ (1 - self._bits)  # (N, 2^d) log-probs of every code
                avg = logp.exp().mean(0)
                codebook = -(avg * (avg + 1e-10).log()).sum()
                loss = loss + self.entropy_weight * (per_sample - codebook)
        return codes, idx, loss

    def indices_to_codes(self, idx):
        bits = (idx.unsqueeze(1) // self._basis.view(1, -1, *([1] * (idx.ndim - 1)))) % 2
        return bits.float() * 2 - 1


class Discriminator(nn.Module):
    """A 3D PatchGAN with anti-aliased (blur-pool) downsampling; returns one logit per patch."""

    def __init__(self, ch: int, n_down: int = 3):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer('blur', (k[:, None, None] * k[None, :, None] * k[None, None, :] / 64)[None, None])
        self.conv_in, c = nn.Conv3d(3, ch, 3, padding=1), ch
        self.downs = nn.ModuleList()
        for _ in range(n_down):
            self.downs.append(nn.Conv3d(c, min(2 * c, 8 * ch), 3, padding=1))
            c = min(2 * c, 8 * ch)
        self.conv_out = nn.Conv3d(c, 1, 3, padding=1)

    def blur_down(self, x):  # (B, C, T, H, W) -> low-pass, then half size (time too while there is any)
        B, C, T, H, W = x.shape
        st = 2 if T > 1 else 1
        x = F.conv3d(F.pad(x.reshape(B * C, 1, T, H, W), (1, 1, 1, 1, 1, 1), mode='replicate'), self.blur.to(x.dtype),
                     stride=(st, 2, 2))
        return x.view(B, C, *x.shape[2:])

    def forward(self, x):  # (B, 3, T, H, W) -> (B, 1, t, h, w) logits
        x = F.leaky_relu(self.conv_in(x), 0.2)
        for conv in self.downs:
            x = F.leaky_relu(conv(self.blur_down(x)), 0.2)
        return self.conv_out(x)


@dataclass
class TokenizerConfig:
    channels: int = 32  # width of the first level
    ch_mult: tuple = (1, 2, 2)  # width of each level as a multiple of channels
    num_res_blocks: int = 1  # residual blocks per level
    down_space: tuple = (True, False)  # halve H and W between level i and i + 1
    down_time: tuple = (True, True)  # halve time (1 + 2k -> 1 + k frames) between level i and i + 1
    patch_size: int = 2  # space-to-depth at the input, depth-to-space at the output
    norm: bool = False  # per-frame GroupNorm in the residual blocks (off learns faster on shapes: RESULTS.md)
    attn: bool = False  # spatial + causal temporal attention at the bottleneck
    n_head: int = 4  # attention heads
    quantizer: str = 'fsq'  # fsq or lfq
    levels: tuple = (4, 4, 4, 4)  # FSQ levels per latent channel; the codebook size is their product (priors learn
    #                               256 codes faster than 8,5,5,5's 1000, which reconstruct as well: RESULTS.md)
    lfq_dim: int = 10  # LFQ bits per code; the codebook size is 2 ** lfq_dim
    entropy_weight: float = 0.1  # LFQ entropy penalty
    commit_weight: float = 0.25  # LFQ commitment loss
    recon_loss: str = 'l2'  # l2 or l1 reconstruction loss (l1 stalls on black backgrounds: RESULTS.md)
    gan_weight: float = 0.0  # weight of the adversarial loss (0 = no GAN, no discriminator)
    disc_channels: int = 32  # discriminator width
    disc_start: int = 2000  # step at which the discriminator starts training
    gen_start: int = 2000  # step at which the generator's adversarial term starts
    r1_weight: float = 0.1  # zero-centred gradient penalty on real clips
    lecam_weight: float = 0.001  # LeCAM regularisation of the discriminator
    lecam_decay: float = 0.99  # EMA decay of the discriminator outputs that LeCAM anchors to
    # the training recipe (train.py's defaults for a tokenizer; a resumed run may change lr, batch_size, max_iters, ema)
    resolution: int = 32  # train on clips area-downsampled to this square size (0 = the data's)
    crop: int = 24  # train on a square of this many pixels from each clip, near its content (0: whole frames):
    #                 a step takes 0.71-0.87x the time, and the priors read the codes as well: RESULTS.md
    crop_steps: float = 0.85  # the share of max_iters trained on crops; the rest on whole frames
    optimizer: str = 'adamw'  # adamw (the only choice: Muon's orthogonal steps are for the prior's matrices)
    lr: float = 1e-3  # peak learning rate (2e-3 collapsed the codebook once: RESULTS.md)
    weight_decay: float = 0.0  # on convolution and linear weights
    betas: tuple = (0.9, 0.99)  # AdamW's betas
    batch_size: int = 8  # clips per micro-step per process
    max_iters: int = 4000  # optimizer steps in total (pipeline.sh trains 2000)
    ema: float = 0.0  # decay of a weight copy that evaluation and sampling use (0 = none)

    @property
    def latent_dim(self) -> int:
        return len(self.levels) if self.quantizer == 'fsq' else self.lfq_dim

    @property
    def factors(self) -> tuple:
        """(temporal, spatial) compression."""
        return 2 ** sum(self.down_time), self.patch_size * 2 ** sum(self.down_space)


class Tokenizer(nn.Module):
    reads = 'pixels'  # forward's x: clips (B, 3, T, H, W) in [-1, 1]
    kind = 'codec'  # sample() reconstructs the clip it is given; encode/decode turn clips into codes and back

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        c = config
        n = len(c.ch_mult)
        if len(c.down_time) != n - 1 or len(c.down_space) != n - 1:
            raise ValueError(f'down_time and down_space need {n - 1} entries (one per transition of ch_mult {c.ch_mult})')
        if c.quantizer not in ('fsq', 'lfq'):
            raise ValueError(f"quantizer must be 'fsq' or 'lfq', got {c.quantizer!r}")
        if c.recon_loss not in ('l1', 'l2'):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {c.recon_loss!r}")
        if c.quantizer == 'fsq' and (len(c.levels) == 0 or min(c.levels) < 2):
            raise ValueError(f'FSQ levels must be integers >= 2, got {c.levels}')
        if c.attn and (c.channels * c.ch_mult[-1]) % c.n_head:
            raise ValueError(f'the bottleneck width {c.channels * c.ch_mult[-1]} must divide by n_head {c.n_head}')
        if c.optimizer != 'adamw':
            raise ValueError(f"the tokenizer trains with optimizer 'adamw' (Muon is for the prior), got {c.optimizer!r}")
        fs = c.patch_size * 2 ** sum(c.down_space)
        if c.crop < 0 or c.crop % fs:
            raise ValueError(f'crop {c.crop} must be 0 (whole frames) or a multiple of the spatial factor {fs}')
        if not 0 <= c.crop_steps <= 1:
            raise ValueError(f'crop_steps {c.crop_steps} is a share of max_iters: between 0 and 1')
        self.config = c
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quant = FSQ(c.levels) if c.quantizer == 'fsq' else LFQ(c.lfq_dim, c.entropy_weight, c.commit_weight)
        self.codebook_size = self.quant.codebook_size
        self.disc = Discriminator(c.disc_channels) if c.gan_weight > 0 else None
        if self.disc is not None:
            self.register_buffer('lecam_ema', torch.zeros(2))  # running means of D(real), D(fake)
        self.last_losses = {}  # parts of the loss for train.py's log
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity='linear')
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, use_ema: bool = True) -> 'Tokenizer':
        """The tokenizer a train.py checkpoint holds (or the 'tokenizer' entry of a prior's), with its EMA
        weights where the run kept them."""
        model = cls(TokenizerConfig(**{'crop': 0, **ckpt['config']}))  # checkpoints before crop trained on whole frames
        model.load_state_dict(ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model'])
        return model

    @torch.no_grad()
    def init_from_data(self, x, text=None):
        """Check that clips of the data fit, and start the decoder's output at their mean colour: Adam moves a
        bias by about lr per step, so learning the background of a mostly black (or grey) dataset would
        otherwise take hundreds of steps."""
        self.check_input(x)
        mean = x.float().mean(dim=tuple(d for d in range(x.ndim) if d != 1))  # (3,)
        self.decoder.conv_out.conv.bias.copy_(mean.repeat_interleave(self.config.patch_size ** 2))

    def check_input(self, x):
        ft, fs = self.config.factors
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f'expected a video (B, 3, T, H, W) or an image (B, 3, H, W), got {tuple(x.shape)}')
        T, H, W = x.shape[2:]
        if (T - 1) % ft or H % fs or W % fs:
            raise ValueError(f'frames must be 1 + {ft}k and height, width multiples of {fs}; got T={T}, H={H}, W={W}')

    def encode_latents(self, x):
        """Continuous latents before quantization: (B, 3, T, H, W) -> (B, d, t, h, w)."""
        self.check_input(x)
        return self.encoder(x)

    def quantize(self, z):
        """-> (quantized latents (B, d, t, h, w), codes (B, t, h, w), auxiliary loss)."""
        return self.quant(z)

    def forward(self, x, text=None, step: int = 0):
        """Reconstruct x (B, 3, T, H, W) or (B, 3, H, W); the loss is reconstruction (+ quantizer terms, + GAN
        terms when training with step >= the starts). text is not read. Returns (reconstruction, loss)."""
        if self.training and x.ndim == 5 and step < self.config.crop_steps * self.config.max_iters:
            x = self.crop(x)
        if self.disc is not None and torch.is_grad_enabled():
            return self.forward_gan(x, step)
        rec, loss, _ = self.reconstruct(x)
        return rec, loss

    @torch.compiler.disable  # eager: compiled, each crop's offsets would be a new graph
    def crop(self, x):
        """A square of config.crop pixels from each clip (B, 3, T, H, W), centred where the clip differs most
        from its mean colour (squared; on shapes, the object's path), then moved at random by up to half the
        room the frame leaves; x itself where the frame is no larger."""
        n, (H, W) = self.config.crop, x.shape[3:]
        if not 0 < n < min(H, W):
            return x
        weight = (x.float() - x.float().mean((2, 3, 4), keepdim=True)).pow(2).sum((1, 2))  # (B, H, W)
        total = weight.sum((1, 2)) + 1e-6
        starts = []
        for size, profile in ((H, weight.sum(2)), (W, weight.sum(1))):  # rows, then columns
            centre = (profile * torch.arange(size, device=x.device)).sum(1) / total  # (B,)
            room = (size - n) // 2
            jitter = torch.randint(-room, room + 1, centre.shape, device=x.device)
            starts.append(((centre - (n - 1) / 2).round().long() + jitter).clamp(0, size - n).tolist())
        return torch.stack([clip[..., r:r + n, c:c + n] for clip, r, c in zip(x, *starts)])

    def reconstruct(self, x):
        """(reconstruction, reconstruction + quantizer loss, (x, reconstruction and loss as videos))."""
        image = x.ndim == 4
        if image:
            x = x.unsqueeze(2)  # (B, 3, 1, H, W): an image is a one-frame video
        q, idx, qloss = self.quantize(self.encode_latents(x))
        rec = self.decoder(q)
        err = (rec.float() - x.float())
        rec_loss = err.abs().mean() if self.config.recon_loss == 'l1' else err.pow(2).mean()
        # parts of the loss for the log; kept undetached: under torch.compile, storing a detached copy on
        # the module made the returned loss lose its gradient (torch 2.13)
        self.last_losses = {'rec': rec_loss}
        return (rec.squeeze(2) if image else rec), rec_loss + qloss, (x, rec, rec_loss)

    @torch.compiler.disable  # the GAN takes gradients inside forward, which a compiled graph cannot: eager
    def forward_gan(self, x, step: int):
        rec, loss, (x, full, rec_loss) = self.reconstruct(x)
        return rec, loss + self.gan_losses(x, full, rec_loss, step)

    def gan_losses(self, real, fake, rec_loss, step: int):
        """Discriminator and generator terms in one scalar. The generator's term goes through a copy of
        D with detached weights, and D's terms see the fake detached, so one backward gives each
        network its own gradient and one optimizer step updates both (DDP sees a single backward)."""
        c = self.config
        params = {k: v.detach() for k, v in self.disc.named_parameters()}
        loss = 0.0 * sum(p.sum() for p in self.disc.parameters())  # every parameter in the graph, for DDP
        if step >= c.gen_start:
            g_adv = F.softplus(-functional_call(self.disc, params, (fake,))).mean()  # non-saturating
            last = self.decoder.conv_out.conv.weight
            # VQGAN's adaptive weight, a ratio of gradient norms. The losses are scaled up by a power of two
            # (exact, the ratio unchanged) so that in float16 their gradients, means over a whole clip's
            # pixels (about 1e-6 each), do not underflow as unscaled ones would (GradScaler scales only the loss)
            g_rec = torch.autograd.grad(rec_loss * ADAPTIVE_SCALE, last, retain_graph=True)[0]
            g_gan = torch.autograd.grad(g_adv * ADAPTIVE_SCALE, last, retain_graph=True)[0]
            weight = (g_rec.norm() / (g_gan.norm() + 1e-4 * ADAPTIVE_SCALE)).clamp(0, 1e4).detach()
            loss = loss + c.gan_weight * weight * g_adv
            self.last_losses['g_adv'] = g_adv
        if step >= c.disc_start:
            real = real.detach().requires_grad_(c.r1_weight > 0)
            d_real, d_fake = self.disc(real), self.disc(fake.detach())
            d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()  # hinge
            if c.r1_weight > 0:
                g, = torch.autograd.grad(d_real.sum(), real, create_graph=True)
                d_loss = d_loss + c.r1_weight / 2 * g.pow(2).sum(dim=(1, 2, 3, 4)).mean()
            with torch.no_grad():
                self.lecam_ema.lerp_(torch.stack([d_real.mean(), d_fake.mean()]).float(), 1 - c.lecam_decay)
            lecam = F.relu(d_real - self.lecam_ema[1]).pow(2).mean() + F.relu(self.lecam_ema[0] - d_fake).pow(2).mean()
            loss = loss + d_loss + c.lecam_weight * lecam
            self.last_losses['d'] = d_loss
        return loss

    def configure_optimizers(self, device_type: str) -> list:
        """[AdamW]; weight decay on conv/linear weights only; the discriminator in its own group."""
        c = self.config
        gen = [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith('disc.')]
        groups = [{'params': [p for n, p in gen if p.dim() >= 2], 'weight_decay': c.weight_decay},
                  {'params': [p for n, p in gen if p.dim() < 2], 'weight_decay': 0.0}]
        if self.disc is not None:
            groups.append({'params': list(self.disc.parameters()), 'weight_decay': 0.0})
        return [torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, fused=device_type in ('cuda', 'cpu'))]

    @torch.no_grad()
    def sample(self, text, x, generator=None):
        """The reconstruction of x (B, 3, T, H, W) in [-1, 1] through the codes: what the tokenizer keeps of a
        clip. text and generator are not read (the tokenizer is deterministic)."""
        return self.decode(self.encode(x)).view_as(x)

    @torch.no_grad()
    def encode(self, x):
        """Video (B, 3, T, H, W) or image (B, 3, H, W) in [-1, 1] -> codes (B, t, h, w) (t = 1 for an image)."""
        if x.ndim == 4:
            x = x.unsqueeze(2)
        return self.quantize(self.encode_latents(x))[1]

    @torch.no_grad()
    def decode(self, codes):
        """Codes (B, t, h, w) -> video (B, 3, T, H, W) in [-1, 1], T = 1 + ft * (t - 1)."""
        return self.decode_latents(self.quant.indices_to_codes(codes))

    @torch.no_grad()
    def decode_latents(self, q):
        """Quantized (or continuous) latents (B, d, t, h, w) -> video (B, 3, T, H, W), clamped to [-1, 1]."""
        return self.decoder(q).clamp(-1, 1)
