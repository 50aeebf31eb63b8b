"""
One transformer over [text tokens ; video tokens], the video tokens being a video tokenizer's codes.

Two modes, one set of weights and code:
- ar:   a causal GPT that predicts each video token from the text and the tokens before it
        (DALL-E, VideoGPT, MUGEN). Sampling uses a KV cache.
- mask: a bidirectional transformer that predicts masked video tokens (MaskGIT, Phenaki): in training a
        cosine-scheduled share of the tokens is replaced by a mask token; sampling fills the clip in a
        few parallel steps, keeping the most confident predictions: first the first latent frame alone
        (an image: text + its h*w tokens), then the rest of the clip as its continuation, the two tasks
        it also trains on (each clip's first frame again, twice, as images); last, the first frame is
        redrawn once more with the whole clip in view.
Both drop the text with a small probability in training, so sampling can use classifier-free guidance.
The text first goes through its own bidirectional blocks (text_layers); the main blocks then attend to it
in the same softmax as to the video, as keys and values only, and compute nothing for its rows (like a
decoder's cross-attention, one softmax; without text layers the text rows go through the blocks too).
Positions are learned and factorised over (time, height, width), plus rotary embeddings over the same
three axes on queries and keys, so attention scores see offsets between tokens (on shapes the masked
prior draws the right shape far more often with them). A model trained on t latent frames continues a
video through a sliding window of t frames (sample.py).

The interface every model file shares (train.py, sample.py, eval.py and bench.py use nothing else):
PriorConfig (its defaults are the CPU recipe), forward(x, text, step) -> (logits, loss),
configure_optimizers(device_type) -> [optimizers], sample(text, x=None, generator=None, **settings),
Prior.from_checkpoint(ckpt), and the class attributes `reads` and `kind`.

References:
- DALL-E: https://arxiv.org/abs/2102.12092      - VideoGPT: https://arxiv.org/abs/2104.10157
- MaskGIT: https://arxiv.org/abs/2202.04200     - Phenaki: https://arxiv.org/abs/2210.02399
- Classifier-free guidance: https://arxiv.org/abs/2207.12598
- Rotary embeddings: https://arxiv.org/abs/2104.09864, in 2D for vision: https://arxiv.org/abs/2403.13298
- Muon (the optimizer of the blocks' matrices): https://kellerjordan.github.io/posts/muon/

Shapes: B batch, L text tokens, N = t*h*w video tokens, C channels, V video vocabulary.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# the default sampling settings of each mode, chosen by caption accuracy on shapes (RESULTS.md). ar guides
# only its first guide_frames latent frames (an unseen combination's colour drifts less); mask draws the
# first latent frame alone in its first first_steps steps (None: a third), then redraws it in refine_steps
# more steps with the whole clip in view, guided by refine_cfg
SAMPLING = {
    'ar': dict(cfg=2.0, temperature=0.4, top_k=None, top_p=None, guide_frames=1, kv_cache=True),
    'mask': dict(cfg=2.0, temperature=0.3, steps=12, first_steps=None, refine_steps=2, refine_cfg=1.0),
}
CHOICE_TEMPERATURE = 4.5  # mask: scale of the noise on the confidence that picks the tokens to keep (MaskGIT)


def rope_table(grid, text_len: int, head_size: int, base: float = 100.0):
    """Rotary positions for [text ; video] tokens: (text_len + t*h*w, head_size // 2, 2), the (cos, sin) of
    each channel pair's angle. The head's pairs are split between time, height and width (about 1/4, 3/8,
    3/8), each pair turned by its axis position times a frequency. Text tokens are not turned. The dot
    product of a query and a key then depends on their offset in (t, h, w), so attention learns
    neighbourhoods."""
    t, h, w = grid
    pairs = head_size // 2
    n_t = pairs // 4
    n_h = (pairs - n_t) // 2
    angles = []
    for n_axis, size, axis in ((n_t, t, 0), (n_h, h, 1), (pairs - n_t - n_h, w, 2)):
        freq = base ** (-torch.arange(n_axis) / max(1, n_axis))  # (n_axis,)
        pos = torch.arange(size).float()
        shape = [1, 1, 1]
        shape[axis] = size
        angles.append((pos[:, None] * freq).view(*shape, n_axis).expand(t, h, w, n_axis))
    angles = torch.cat(angles, -1).reshape(t * h * w, pairs)
    angles = torch.cat([torch.zeros(text_len, pairs), angles])  # (L + N, head_size // 2)
    return torch.stack([angles.cos(), angles.sin()], -1)


def rotate(x, rope):
    """Turn each channel pair (x0, x1) of x (..., S, hd) by the angle of its position, rope (S, hd // 2, 2)
    from rope_table: (x0 cos - x1 sin, x1 cos + x0 sin), in float32. Eager, one complex multiply: the whole
    training step is 3-5 % faster than with real arithmetic on the halves. Compiled, the real arithmetic,
    which inductor fuses into one kernel (it has no code generation for complex numbers): RESULTS.md."""
    if torch.compiler.is_compiling():
        cos, sin = rope.unbind(-1)
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2).to(x.dtype)
    turned = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * torch.view_as_complex(rope)
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


def attend(q, k, v, causal: bool, dropout: float = 0.0):
    """Attention of q (B, nh, Sq, hd) over k, v (B, nh, Sk, hd), Sk >= Sq. causal: the queries are the last
    Sq of the Sk positions (context rows come first), and each sees the keys up to its own. SDPA (flash on
    GPU when Sq == Sk), except in bfloat16 on CPU, where PyTorch's flash kernel is slow at these head sizes
    and a plain matmul-softmax-matmul (the causal mask added inside the first matmul) makes the whole
    training step 16-26 % faster; but not without gradients (sampling, validation), where SDPA's forward is
    the faster (mask sampling 1.4x, the one query of a KV cache's pass 1.4-1.8x: RESULTS.md)."""
    Sq, Sk = q.shape[2], k.shape[2]
    causal = causal and Sq > 1  # one query (the KV cache's new token) sees every key
    if q.device.type != 'cpu' or q.dtype != torch.bfloat16 or Sq == 1 or not torch.is_grad_enabled():
        # a mask only where is_causal's alignment (query i sees keys <= i) is not the one wanted
        sees = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq) if causal and Sq != Sk else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sees, is_causal=causal and sees is None,
                                              dropout_p=dropout)
    q = q * q.shape[-1] ** -0.5
    if not causal:
        att = q @ k.transpose(-2, -1)  # (B, nh, Sq, Sk)
    else:  # the mask added inside the matmul (baddbmm): a masked_fill pass after it was 1.2-1.4x slower a step
        unseen = torch.full((Sq, Sk), float('-inf'), dtype=q.dtype, device=q.device).triu(Sk - Sq + 1)
        att = torch.baddbmm(unseen, q.flatten(0, 1), k.flatten(0, 1).transpose(-2, -1)).view(*q.shape[:3], Sk)
    return F.dropout(att.softmax(-1), dropout) @ v  # softmax sums in float32 inside


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, causal: bool, rope, cache=None, context=None):
        """rope: rope_table's rows of the positions of x, or None for no turn. cache: a dict {'size': sequence
        length} that this layer fills with its keys and values (sampling); x then holds only the new tokens.
        context (B, L, C): rows before x that x attends to, as keys and values only (the text)."""
        B, S, C = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, S, hd)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        if context is not None:  # keys and values of the context rows (not turned, like text), no queries
            kv = F.linear(context, self.qkv.weight[C:], self.qkv.bias[C:])
            ck, cv = kv.view(B, context.shape[1], 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
        if cache is not None:  # keys and values go into buffers sized for the whole sequence: no copy a token
            if 'k' not in cache:
                shape = (B, self.n_head, cache['size'], C // self.n_head)
                cache.update(k=k.new_empty(shape), v=v.new_empty(shape), n=0)
            n = cache['n'] + k.shape[2]
            cache['k'][:, :, cache['n']:n], cache['v'][:, :, cache['n']:n] = k, v
            k, v, cache['n'] = cache['k'][:, :, :n], cache['v'][:, :, :n], n
        y = attend(q, k, v, causal, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, S, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(n_embd), Attention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        # the exact GELU: in bfloat16 on CPU the tanh one's forward + backward is 6x slower (RESULTS.md)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, causal: bool, rope, cache=None, context=None):
        context = None if context is None else self.ln1(context)
        x = x + self.drop(self.attn(self.ln1(x), causal, rope, cache, context))
        return x + self.drop(self.mlp(self.ln2(x)))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, orthogonalised by five quintic Newton-Schulz steps in bfloat16,
    scaled to AdamW's update size (0.2 sqrt(max(rows, cols))) so that AdamW's lr and weight decay carry over;
    torch.optim.Muon(adjust_lr_fn='match_rms_adamw')'s update. Its matrices of one shape are orthogonalised
    together in batched matmuls, not one by one: on two CPU cores the step of the pipeline's prior's 24
    matrices takes half the time (RESULTS.md)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.1, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        if any(p.dim() != 2 for g in self.param_groups for p in g['params']):
            raise ValueError('Muon takes 2-D weights only')

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            params = [p for p in g['params'] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault('momentum_buffer', torch.zeros_like(p)) for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - g['momentum'])
            updates = torch._foreach_lerp(grads, bufs, g['momentum'])  # Nesterov
            torch._foreach_mul_(params, 1 - g['lr'] * g['weight_decay'])
            shapes = {}  # wide shape -> indices of its matrices
            for i, p in enumerate(params):
                shapes.setdefault((min(p.shape), max(p.shape)), []).append(i)
            for (rows, cols), idx in shapes.items():
                X = torch.stack([updates[i] if updates[i].shape[0] == rows else updates[i].T for i in idx]).bfloat16()
                X = X / X.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)
                for _ in range(g['ns_steps']):
                    A = X @ X.mT
                    X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=-4.7750, alpha=2.0315), X, beta=3.4445)
                scale = -g['lr'] * 0.2 * math.sqrt(cols)
                for i, x in zip(idx, X):
                    params[i].add_(x if params[i].shape[0] == rows else x.T, alpha=scale)
        return loss


@dataclass
class PriorConfig:
    mode: str = 'ar'  # ar (causal GPT) or mask (MaskGIT)
    vocab_size: int = 256  # the tokenizer's codebook size (train.py sets it from the tokenizer)
    text_vocab: int = 512  # text ids are below this (train.py sets the text fields from the data)
    text_len: int = 16  # text tokens per caption
    pad_id: int = 0  # the text pad id; a caption of pads only is the unconditional prompt
    grid: tuple = (5, 8, 8)  # latent (frames, height, width) of one training clip
    n_layer: int = 4  # transformer blocks
    text_layers: int = 2  # bidirectional blocks over the text alone before the blocks read it (held-out
    #                       phrasings 0.83 -> 0.90 for ar, 0.81 -> 0.92-0.95 for mask at its lower lr: RESULTS.md)
    text_context: bool = True  # with text layers: the blocks read their text as keys and values only and compute
    #                        nothing for its rows (a step 1.06-1.17x as fast, as accurate: RESULTS.md); False, or
    #                        no text layers: the text rows go through the blocks with the video
    n_head: int = 6  # attention heads (the head size n_embd / n_head must be even for the rotary positions)
    n_embd: int = 192  # width
    dropout: float = 0.0  # in the blocks' residual branches and attention
    cfg_drop: float = 0.1  # probability of training on the unconditional prompt (for guidance)
    rope: bool = True  # rotary (t, h, w) positions on queries and keys, on top of the learned ones
    prefix_prob: float = 0.5  # mask: share of training clips whose first 1 .. t-1 latent frames stay visible
    image_share: float = 2.0  # mask: first latent frames trained again alone, as images, per clip (0.5: half
    #                           the batch's; 2: each clip's twice, with other masks)
    # the training recipe (train.py's defaults for a prior; a resumed run may change lr, batch_size, max_iters, ema)
    resolution: int = 32  # the clips' square size, which must be the tokenizer's (0 = the data's)
    optimizer: str = 'muon'  # muon: Muon for the blocks' matrices, AdamW for the rest; or adamw for all
    lr: float = 0.0  # peak learning rate; 0: the mode's, 6e-3 for ar and 3e-3 for mask (with text layers mask lost
    #                  the motion at 6e-3: RESULTS.md). Muon's steps are scaled to AdamW's size, so one lr fits both
    weight_decay: float = 0.1  # on matrices and embeddings, not on biases, norms or positions
    betas: tuple = (0.9, 0.99)  # AdamW's betas
    batch_size: int = 8  # clips per micro-step per process
    max_iters: int = 0  # optimizer steps in total; 0: the mode's, 2000 for ar (0.8x the time; captions 1.5 points
    #                     lower than at 2500, held-out phrasings 5.6 higher: 2500 lost them in one run of three) and
    #                     2500 for mask (at 2000 it lost 10 points): RESULTS.md
    ema: float = 0.99  # decay of the weight copy that evaluation and sampling use (0 = none)

    def __post_init__(self):  # the mode's defaults, resolved here so that train.py and checkpoints see them
        self.lr = self.lr or (3e-3 if self.mode == 'mask' else 6e-3)
        self.max_iters = self.max_iters or (2500 if self.mode == 'mask' else 2000)


class Prior(nn.Module):
    reads = 'codes'  # forward's x: the tokenizer's codes (B, t, h, w), which train.py caches
    kind = 'generator'  # sample() makes videos from text

    def __init__(self, config: PriorConfig):
        super().__init__()
        c = config
        if c.mode not in ('ar', 'mask'):
            raise ValueError(f"mode must be 'ar' or 'mask', got {c.mode!r}")
        if c.n_embd % c.n_head:
            raise ValueError(f'n_embd {c.n_embd} must divide by n_head {c.n_head}')
        if c.rope and (c.n_embd // c.n_head) % 2:
            raise ValueError(f'rotary positions turn channel pairs: the head size n_embd / n_head = '
                             f'{c.n_embd // c.n_head} must be even (or --no-rope)')
        if len(c.grid) != 3:
            raise ValueError(f'grid is (frames, height, width) of the latent clip, got {c.grid}')
        if not 0 <= c.image_share <= 16:
            raise ValueError(f'image_share {c.image_share} is images per training clip: between 0 and 16')
        if not 0 <= c.prefix_prob <= 1:
            raise ValueError(f'prefix_prob {c.prefix_prob} is a share of the training clips: between 0 and 1')
        if c.optimizer not in ('adamw', 'muon'):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {c.optimizer!r}")
        if c.text_layers < 0:
            raise ValueError(f'text_layers {c.text_layers} is a number of blocks: 0 or more')
        c.text_context = c.text_context and c.text_layers > 0  # as used, in the checkpoint
        self.config = c
        t, h, w = c.grid
        self.n_video = t * h * w
        self.text_emb = nn.Embedding(c.text_vocab, c.n_embd)
        self.tok_emb = nn.Embedding(c.vocab_size + 1, c.n_embd)  # + the mask token (mask mode)
        self.text_pos = nn.Parameter(torch.zeros(c.text_len, c.n_embd))
        self.pos_t, self.pos_h, self.pos_w = (nn.Parameter(torch.zeros(n, c.n_embd)) for n in (t, h, w))
        self.text_blocks = nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout) for _ in range(c.text_layers))
        self.blocks = nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout) for _ in range(c.n_layer))
        if c.text_context and c.mode == 'ar':  # the row that predicts the first video token
            self.start = nn.Parameter(torch.zeros(c.n_embd))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        rope = rope_table(c.grid, c.text_len, c.n_embd // c.n_head) if c.rope else None
        self.register_buffer('rope', rope, persistent=False)
        self.last_losses = {}  # parts of the loss for train.py's log (none here)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(('attn.proj.weight', 'mlp.2.weight')):  # GPT-2's scaled residual projections
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layer))
        for name, p in self.named_parameters():
            if name in ('text_pos', 'pos_t', 'pos_h', 'pos_w', 'start'):
                nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, 'bias', None) is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, use_ema: bool = True) -> 'Prior':
        """The prior a train.py checkpoint holds, with its EMA weights where the run kept them. Priors saved
        before rotary positions, prefix or image training or text layers had no such fields: they sample as
        they trained."""
        config = {'rope': False, 'prefix_prob': 0.0, 'image_share': 0.0, 'text_layers': 0, 'text_context': False,
                  **ckpt['config']}
        config.pop('first_prob', None)  # an older way to train the first frame (image_share replaced it)
        model = cls(PriorConfig(**config))
        model.load_state_dict(ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model'])
        return model

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    def video_pos(self):  # (N, C): positions of one clip's tokens, time-major
        t, h, w = self.config.grid
        pos = self.pos_t[:, None, None] + self.pos_h[None, :, None] + self.pos_w[None, None, :]  # (t,h,w,C)
        return pos.view(t * h * w, -1)

    def embed(self, text, video):
        """text (B, L) ids, video (B, n) codes (n <= N, the clip's first tokens) -> (x, context, start): the
        rows the blocks run on, the text rows they only read (or None) and x's first position in the sequence
        [text ; video] (rope_table's rows). Without text_context, x is [text ; video] (B, L + n, C) and starts
        at 0; with it, x is video (B, n, C) from L, and for ar a start row in front of it (position L - 1,
        like the last text row it stands in for), so in either layout x's rows from position L - 1 on predict
        the video tokens."""
        L = text.shape[1]
        x_text = self.text_emb(text) + self.text_pos[:L]
        for block in self.text_blocks:  # text positions take no rotary turn
            x_text = block(x_text, False, None)
        x_video = self.tok_emb(video) + self.video_pos()[:video.shape[1]]
        if not self.config.text_context:
            return torch.cat([x_text, x_video], 1), None, 0
        if self.config.mode == 'mask':
            return x_video, x_text, L
        return torch.cat([self.start.expand(len(text), 1, -1), x_video], 1), x_text, L - 1

    def transformer(self, x, causal: bool, start: int = 0, caches=None, context=None):
        """The blocks on x (B, S, C), the embeddings of sequence positions start .. start + S, after the
        context rows (B, L, C) if given; caches: one dict per block for sampling with a KV cache (see
        Attention)."""
        rope = None if self.rope is None else self.rope[start:start + x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, causal, rope, None if caches is None else caches[i], context)
        return x

    def logits(self, x):  # (B, S, C) -> (B, S, V)
        return self.head(self.ln_f(x))

    def check(self, codes, text):
        c = self.config
        if text is None or text.ndim != 2 or text.shape[1] != c.text_len:
            got = None if text is None else tuple(text.shape)
            raise ValueError(f'text must be (B, {c.text_len}) ids, got {got}')
        if codes.ndim != 4 or tuple(codes.shape[1:]) != tuple(c.grid):
            raise ValueError(f'codes must be (B, {", ".join(map(str, c.grid))}), got {tuple(codes.shape)}')

    def init_from_data(self, x, text):
        """Check that a batch of the data fits the model; the prior needs no data-dependent start."""
        self.check(x, text)

    # -------------------------------------------------------------------------
    # training

    def forward(self, x, text, step: int = 0):
        """x (B, t, h, w) codes, text (B, L) ids -> (logits (B, N, V), cross-entropy loss in fp32).
        ar: logits[:, i] predicts token i from the text and tokens < i; mask: the loss of masked tokens."""
        self.check(x, text)
        B, L = text.shape
        video = x.reshape(B, -1)  # (B, N) time-major
        if self.training:  # the unconditional prompt with probability cfg_drop, for guidance
            drop = torch.rand(B, 1, device=text.device) < self.config.cfg_drop
            text = torch.where(drop, torch.full_like(text, self.config.pad_id), text)
        if self.config.mode == 'ar':
            x, context, start = self.embed(text, video[:, :-1])  # the last token is no input
            x = self.transformer(x, True, start, context=context)
            logits = self.logits(x[:, L - 1 - start:])  # (B, N, V): from the last text position on
            return logits, F.cross_entropy(logits.float().view(-1, logits.shape[-1]), video.reshape(-1))
        masked = self.mask_pattern(B, video.device)  # (B, N)
        x, context, start = self.embed(text, torch.where(masked, self.mask_id, video))
        logits = self.logits(self.transformer(x, False, start, context=context)[:, L - start:])
        # the mean over the masked tokens, as a weighted mean over all: no data-dependent shapes (compile)
        ce = F.cross_entropy(logits.float().flatten(0, 1), video.flatten(), reduction='none').view(B, -1)
        total, count = (ce * masked).sum(), masked.sum()
        t, h, w = self.config.grid
        n_image = round(self.config.image_share * B) if t > 1 else 0  # one frame: the clip is an image
        if n_image:  # the first latent frames alone, text + h*w tokens: the image that sampling draws first
            rows = torch.arange(n_image, device=video.device) % B  # above 1, each clip's again, other masks
            image = video[rows, :h * w]
            masked = self.mask_pattern(n_image, video.device, frames=1)
            x, context, start = self.embed(text[rows], torch.where(masked, self.mask_id, image))
            x = self.transformer(x, False, start, context=context)
            logits_image = self.logits(x[:, L - start:]).float().flatten(0, 1)
            ce = F.cross_entropy(logits_image, image.flatten(), reduction='none')
            total, count = total + (ce.view(n_image, -1) * masked).sum(), count + masked.sum()
        return logits, total / count

    def mask_pattern(self, B: int, device, frames: int | None = None) -> torch.Tensor:
        """mask mode's training pattern, (B, frames*h*w) bool, frames the clip's t (default) or 1 for images:
        a cosine-scheduled share of the tokens (at least one) is hidden. With probability prefix_prob a clip
        keeps its first 1 .. t-1 latent frames visible and the share is of the tokens after them: the
        continuation that the sliding window and image to video ask for."""
        _, h, w = self.config.grid
        t = frames or self.config.grid[0]
        n = t * h * w
        ratio = torch.cos(torch.rand(B, 1, device=device) * math.pi / 2)
        kind = torch.rand(B, 1, device=device)
        prefix = torch.randint(1, max(t, 2), (B, 1), device=device) * h * w
        prefix = torch.where((t > 1) & (kind < self.config.prefix_prob), prefix, 0)
        k = (ratio * (n - prefix)).ceil().clamp(min=1)
        kept = (torch.arange(n, device=device) < prefix).float()
        score = torch.rand(B, n, device=device) + kept  # the prefix ranks last: never hidden
        return score.argsort(1).argsort(1) < k

    def configure_optimizers(self, device_type: str) -> list:
        """AdamW; decay the matrices (and embeddings), not biases, norms or positions. With optimizer 'muon'
        the blocks' matrices take Muon's steps instead, momentum orthogonalised by a Newton-Schulz iteration,
        scaled to AdamW's update size so that lr and weight_decay carry over: [AdamW, Muon]."""
        c = self.config
        muon = c.optimizer == 'muon'
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        hidden = {id(p) for n, p in named if muon and p.dim() == 2 and n.startswith(('blocks.', 'text_blocks.'))}
        decay = {id(p) for n, p in named if p.dim() >= 2 and not n.startswith(('text_pos', 'pos_'))} - hidden
        pick = lambda keep: [p for n, p in named if keep(id(p))]
        groups = [{'params': pick(lambda i: i in decay), 'weight_decay': c.weight_decay},
                  {'params': pick(lambda i: i not in decay and i not in hidden), 'weight_decay': 0.0}]
        adamw = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, fused=device_type in ('cuda', 'cpu'))
        if not muon:
            return [adamw]
        return [adamw, Muon(pick(lambda i: i in hidden), lr=c.lr, weight_decay=c.weight_decay)]

    # -------------------------------------------------------------------------
    # sampling

    def settings(self, **kw) -> dict:
        """This mode's sampling settings: its defaults (SAMPLING) with those of kw that are not None, checked.
        A setting of the other mode is an error that says so."""
        mode = self.config.mode
        other = 'mask' if mode == 'ar' else 'ar'
        given = {k: v for k, v in kw.items() if v is not None}
        for k in given:
            if k in SAMPLING[other] and k not in SAMPLING[mode]:
                raise ValueError(f'{k} is a setting of {other} priors, not of this {mode} prior')
            if k not in SAMPLING[mode]:
                raise ValueError(f'{k} is not a sampling setting of a {mode} prior: '
                                 f'{", ".join(SAMPLING[mode])}')
        s = {**SAMPLING[mode], **given}
        if s['temperature'] < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {s['temperature']}")
        if mode == 'ar':
            if s['guide_frames'] < 1:
                raise ValueError(f"guide_frames must be at least 1 latent frame, got {s['guide_frames']}")
            if s['top_k'] is not None and s['top_k'] < 1:
                raise ValueError(f"top_k must be at least 1, got {s['top_k']}")
            if s['top_p'] is not None and not 0 < s['top_p'] <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {s['top_p']}")
            return s
        if s['steps'] < 1:
            raise ValueError(f"steps must be at least 1, got {s['steps']}")
        s['first_steps'] = s['steps'] // 3 if s['first_steps'] is None else s['first_steps']
        if not 0 <= s['first_steps'] < s['steps']:
            raise ValueError(f"first_steps must be in [0, steps) = [0, {s['steps']}), got {s['first_steps']} "
                             '(0 decodes every frame at once)')
        if s['refine_steps'] < 0:
            raise ValueError(f"refine_steps must be >= 0, got {s['refine_steps']}")
        return s

    @torch.no_grad()
    def sample(self, text, x=None, generator: torch.Generator | None = None, new_prompt: bool = False, **kw):
        """Codes (B, t, h, w) of one clip for text (B, L) ids. x (B, t0, h, w): the clip's first latent
        frames, given and kept (image to video, continuation). new_prompt: x was made for another prompt (a
        story's next part), so ar guides every frame it makes and the new prompt steers. kw: settings."""
        s = self.settings(**kw)
        B, (t, h, w) = text.shape[0], self.config.grid
        if x is not None and (x.shape[0] != B or tuple(x.shape[2:]) != (h, w) or x.shape[1] > t):
            raise ValueError(f'x must be (B, <= {t}, {h}, {w}) codes, got {tuple(x.shape)}')
        video = torch.zeros(B, self.n_video, dtype=torch.long, device=text.device)
        given = 0 if x is None else x.shape[1] * h * w
        if x is not None:
            video[:, :given] = x.reshape(B, -1)
        if self.config.mode == 'ar':
            s = dict(s, guide_frames=t) if new_prompt else s
            # on CPU a bfloat16 matmul of a few rows is slower than a float32 one, so fewer than 16 videos decode
            # token by token in float32 (4 videos 1.3x as fast; from 16 bfloat16 is faster: RESULTS.md)
            few = s['kv_cache'] and text.device.type == 'cpu' and B < 16 and torch.is_autocast_enabled('cpu')
            with torch.autocast('cpu', enabled=False) if few else contextlib.nullcontext():
                self.sample_ar(text, video, given, generator=generator, **s)
        else:
            self.sample_mask(text, video, given, generator=generator, **s)
        return video.view(B, t, h, w)

    def paired(self, text, cfg: float):
        """The batch that guidance needs, [conditional ; unconditional]; at scale 1 the conditional alone."""
        return text if cfg == 1.0 else torch.cat([text, torch.full_like(text, self.config.pad_id)])

    @staticmethod
    def guided(logits, cfg: float):
        """Classifier-free guidance on logits of a paired batch."""
        if cfg == 1.0:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + cfg * (cond - uncond)

    @staticmethod
    def sample_logits(logits, temperature: float, top_k: int | None, top_p: float | None, generator):
        """(B, V) logits -> (B,) samples; temperature 0 is argmax."""
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float('inf'))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix of mass top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), -float('inf'))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)

    def sample_ar(self, text, video, given: int, cfg: float, temperature: float, top_k, top_p,
                  guide_frames: int, kv_cache: bool, generator=None):
        """Fill video (B, N)[:, given:] token by token, guided on the first guide_frames latent frames made,
        the conditional model alone after them. kv_cache False recomputes the whole sequence for every
        token (the reference that the cache must match, and what it saves)."""
        B, (_, h, w) = video.shape[0], self.config.grid
        text2 = self.paired(text, cfg)
        copies = text2.shape[0] // B
        L = text2.shape[1]
        caches = [dict(size=L + self.n_video) for _ in self.blocks] if kv_cache else None
        x, context, start = self.embed(text2, video[:, :given].repeat(copies, 1))  # the prompt at once
        pos = self.video_pos()
        for i in range(given, self.n_video):
            if i == given + guide_frames * h * w and copies == 2:  # guidance ends: so does the second half
                copies, cfg, text2, x = 1, 1.0, text2[:B], x[:B]
                for cache in caches or []:
                    cache['k'], cache['v'] = cache['k'][:B], cache['v'][:B]
            if kv_cache:  # the first pass reads the context (the text) into the caches, the later ones not
                x = self.transformer(x, True, start, caches, context if i == given else None)
                start = L + i  # the next pass: token i, at its sequence position
            else:
                x, context, start = self.embed(text2, video[:, :i].repeat(copies, 1))
                x = self.transformer(x, True, start, context=context)
            logits = self.guided(self.logits(x[:, -1]).float(), cfg)  # (B, V)
            video[:, i] = self.sample_logits(logits, temperature, top_k, top_p, generator)
            if kv_cache:  # the next pass sees the new token alone
                x = self.tok_emb(video[:, i:i + 1].repeat(copies, 1)) + pos[i:i + 1]  # (copies * B, 1, C)

    def sample_mask(self, text, video, given: int, cfg: float, temperature: float, steps: int,
                    first_steps: int, refine_steps: int, refine_cfg: float, generator=None):
        """Fill video (B, N)[:, given:] in steps parallel steps. Without given tokens the first first_steps
        draw the first latent frame alone (as an image, if the prior trained on images), the rest continue
        it, and refine_steps more redraw it with the whole clip in view, which shows shapes more sharply."""
        t, h, w = self.config.grid
        n, text2 = h * w, self.paired(text, cfg)
        if given == 0 and first_steps > 0 and t > 1:  # the first latent frame alone, then the rest after it
            first = video[:, :n] if self.config.image_share > 0 else video
            self.decode_steps(text2, first, 0, n, cfg, temperature, first_steps, generator)
            self.decode_steps(text2, video, n, self.n_video, cfg, temperature, steps - first_steps, generator)
        else:
            self.decode_steps(text2, video, given, self.n_video, cfg, temperature, steps, generator)
        if given == 0 and refine_steps > 0 and t > 1:  # redraw the first latent frame from the whole clip
            self.decode_steps(self.paired(text, refine_cfg), video, 0, n, refine_cfg, temperature,
                              refine_steps, generator, see_after=True)

    def decode_steps(self, text2, video, lo: int, hi: int, cfg: float, temperature: float, steps: int,
                     generator, see_after: bool = False):
        """Fill video[:, lo:hi] in `steps` parallel steps from the text and video[:, :lo]; the tokens from hi
        on stay masked, as a clip's later frames were in training, or are seen as given with see_after."""
        B, N = video.shape
        pos = torch.arange(N, device=video.device).expand(B, N)
        later = (pos >= hi) & (not see_after)
        known = (pos < lo) | ((pos >= hi) & see_after)
        copies = text2.shape[0] // B  # 2 with guidance
        def gumbel(shape):
            u = torch.rand(shape, generator=generator, device=video.device)
            return -torch.log(-torch.log(u.clamp(1e-20, 1)))
        for s in range(steps):
            x, context, start = self.embed(text2, torch.where(known, video, self.mask_id).repeat(copies, 1))
            x = self.transformer(x, False, start, context=context)
            logits = self.guided(self.logits(x[:, -N:]).float(), cfg)  # (B, N, V)
            if temperature > 0:
                sample = (logits / temperature + gumbel(logits.shape)).argmax(-1)
            else:
                sample = logits.argmax(-1)
            # keep the most confident tokens, the confidence perturbed by Gumbel noise that fades over the
            # steps (MaskGIT's choice temperature): else the background is always surest, objects never start
            conf = logits.log_softmax(-1).gather(-1, sample[..., None]).squeeze(-1)
            if temperature > 0:
                conf = conf + CHOICE_TEMPERATURE * (1 - (s + 1) / steps) * gumbel(conf.shape)
            # the given tokens stay, the later ones wait
            conf = conf.masked_fill(known, float('inf')).masked_fill(later, -float('inf'))
            # after step s, cos(pi/2 * (s+1)/steps) of the free tokens are still masked
            n_masked = int(math.floor((hi - lo) * math.cos(math.pi / 2 * (s + 1) / steps)))
            video.copy_(torch.where(known | later, video, sample))
            remask = torch.zeros_like(known)
            least = conf.topk(n_masked + (0 if see_after else N - hi), largest=False).indices
            remask.scatter_(1, least, True)
            known = ~remask
