"""
One transformer over [text tokens ; video tokens], the video tokens being a video tokenizer's codes.

Two modes, one set of weights and code:
- ar:   a causal GPT that predicts each video token from the text and the tokens before it
        (DALL-E, VideoGPT, MUGEN). Sampling uses a KV cache.
- mask: a bidirectional transformer that predicts masked video tokens (MaskGIT, Phenaki): in training a
        cosine-scheduled share of the tokens is replaced by a mask token; sampling fills the clip in a
        few parallel steps, keeping the most confident predictions: first the first latent frame alone
        (an image: text + its h*w tokens), then the rest of the clip as its continuation, the two tasks it
        also trains on (each clip's first frame again, twice, as images); last, the first frame is redrawn once
        more with the whole clip in view.
Both drop the text with a small probability in training, so sampling can use classifier-free guidance.
Positions are learned and factorised over (time, height, width), plus rotary embeddings over the same three
axes on queries and keys, so attention scores see offsets between tokens (on shapes the masked prior draws
the right shape far more often with them). A model trained on t latent frames continues a video through a
sliding window of t frames.

References:
- DALL-E: https://arxiv.org/abs/2102.12092      - VideoGPT: https://arxiv.org/abs/2104.10157
- MaskGIT: https://arxiv.org/abs/2202.04200     - Phenaki: https://arxiv.org/abs/2210.02399
- Classifier-free guidance: https://arxiv.org/abs/2207.12598
- Rotary embeddings: https://arxiv.org/abs/2104.09864, in 2D for vision: https://arxiv.org/abs/2403.13298
- Muon (the optimizer, optional): https://kellerjordan.github.io/posts/muon/

Shapes: B batch, L text tokens, N = t*h*w video tokens, C channels, V video vocabulary.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# default sampling settings per mode, chosen by caption accuracy on shapes (eval.py; RESULTS.md)
# (ar: guidance on the first guide_frames latent frames generated, then the conditional model alone;
# mask: refine_steps extra steps that redraw the first latent frame once the clip exists, guided by refine_cfg)
SAMPLING = {'ar': dict(cfg=2.0, temperature=0.4, guide_frames=1),
            'mask': dict(cfg=2.0, temperature=0.3, refine_steps=2, refine_cfg=1.0)}
CHOICE_TEMPERATURE = 4.5  # mask: scale of the noise on the confidence that picks the tokens to keep (MaskGIT)


def mask_first_steps(steps: int, first_steps: int | None = None) -> int:
    """mask: how many of `steps` decoding steps draw the first latent frame alone (None: a third). Drawing the
    image first and then its motion keeps an unseen combination's colour better than drawing every frame at
    once (on shapes, held-out all-four 0.46 -> 0.60 at 12 steps; RESULTS.md)."""
    if steps < 1:
        raise ValueError(f'steps must be at least 1, got {steps}')
    first_steps = steps // 3 if first_steps is None else first_steps
    if not 0 <= first_steps < steps:
        raise ValueError(f'first_steps must be in [0, steps) = [0, {steps}), got {first_steps} '
                         '(0 decodes every frame at once)')
    return first_steps


def rope_tables(grid, text_len: int, head_size: int, base: float = 100.0):
    """Rotary position tables (cos, sin), each (text_len + t*h*w, head_size // 2), for [text ; video] tokens: the
    head's channel pairs are split between time, height and width (about 1/4, 3/8, 3/8), each pair turned by
    its axis position times a frequency. Text tokens are not turned. The dot product of a query and a key then
    depends on their offset in (t, h, w), so attention learns neighbourhoods (RoFormer, RoPE-ViT)."""
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
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Turn each channel pair (x0, x1) of x (..., S, hd) by the angles of its position (cos, sin: (S, hd // 2)):
    (x0 cos - x1 sin, x1 cos + x0 sin). Written with unbind and stack: compiled, its backward took 0.8 ms a
    layer in the pipeline's training step, against 10.7 ms for strided slices (x[..., ::2]) on the same CPU."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # 2 x (..., S, hd // 2)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2).to(x.dtype)


def attend(q, k, v, causal: bool, dropout: float = 0.0):
    """Attention of q (B, nh, Sq, hd) over k, v (B, nh, Sk, hd), causal when Sq == Sk. SDPA (flash on GPU), except
    in bfloat16 on CPU: there PyTorch's flash kernel is slow at these head sizes (and slower in bfloat16 than in
    float32), and the plain matmul-softmax-matmul is 16-26 % faster for the whole training step (RESULTS.md)."""
    if q.device.type != 'cpu' or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)
    att = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, nh, Sq, Sk)
    if causal:
        future = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        att = att.masked_fill(future, float('-inf'))
    return F.dropout(att.softmax(-1), dropout) @ v  # softmax sums in float32 inside


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, causal: bool, rope, cache=None):
        """rope: (cos, sin) of the positions of x, each (S, head size) (rotate). cache: a dict {'size': sequence
        length} that this layer fills with its keys and values (sampling); x then holds only the new tokens."""
        B, S, C = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, S, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, S, hd)
        q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:  # keys and values go into buffers sized for the whole sequence: no copy per token
            if 'k' not in cache:
                shape = (B, self.n_head, cache['size'], C // self.n_head)
                cache.update(k=k.new_empty(shape), v=v.new_empty(shape), n=0)
            n = cache['n'] + S
            cache['k'][:, :, n - S:n], cache['v'][:, :, n - S:n] = k, v
            k, v, cache['n'] = cache['k'][:, :, :n], cache['v'][:, :, :n], n
        # with a cache and one new token, the query may see every key: no mask needed
        y = attend(q, k, v, causal and q.shape[2] == k.shape[2], self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, S, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(n_embd), Attention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        # the exact GELU: in bfloat16 on CPU the tanh approximation's forward + backward is 6x slower
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, causal: bool, rope, cache=None):
        x = x + self.drop(self.attn(self.ln1(x), causal, rope, cache))
        return x + self.drop(self.mlp(self.ln2(x)))


@dataclass
class PriorConfig:
    mode: str = 'ar'  # ar (causal GPT) or mask (MaskGIT)
    vocab_size: int = 1000  # the tokenizer's codebook size
    text_vocab: int = 512  # text ids are below this
    text_len: int = 32  # text tokens per caption
    pad_id: int = 0  # the text pad id; a caption of pads only is the unconditional prompt
    grid: tuple = (5, 8, 8)  # latent (frames, height, width) of one training clip
    n_layer: int = 4
    n_head: int = 6
    n_embd: int = 192
    dropout: float = 0.0
    cfg_drop: float = 0.1  # probability of training on the unconditional prompt (for guidance)
    rope: bool = True  # rotary (t, h, w) positions on queries and keys, on top of the learned ones
    prefix_prob: float = 0.5  # mask: share of training clips whose first 1 .. t-1 latent frames stay visible
    first_prob: float = 0.0  # mask: share of training clips that hide every latent frame after the first
    image_share: float = 2.0  # mask: first latent frames trained again alone, as images, per clip (0.5: half the
    #                           batch's; 2: each clip's twice, with other masks)


class Prior(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        c = config
        if c.mode not in ('ar', 'mask'):
            raise ValueError(f"mode must be 'ar' or 'mask', got {c.mode!r}")
        if c.n_embd % c.n_head:
            raise ValueError(f'n_embd {c.n_embd} must divide by n_head {c.n_head}')
        if c.rope and (c.n_embd // c.n_head) % 2:
            raise ValueError(f'rotary positions turn channel pairs: the head size n_embd / n_head = {c.n_embd // c.n_head} '
                             'must be even (or --no-rope)')
        if len(c.grid) != 3:
            raise ValueError(f'grid is (frames, height, width) of the latent clip, got {c.grid}')
        if not 0 <= c.image_share <= 16:
            raise ValueError(f'image_share {c.image_share} is images per training clip: between 0 and 16')
        if min(c.prefix_prob, c.first_prob) < 0 or c.prefix_prob + c.first_prob > 1:
            raise ValueError(f'prefix_prob {c.prefix_prob} and first_prob {c.first_prob} are shares of the training '
                             'clips: each at least 0, together at most 1')
        self.config = c
        t, h, w = c.grid
        self.n_video = t * h * w
        self.text_emb = nn.Embedding(c.text_vocab, c.n_embd)
        self.tok_emb = nn.Embedding(c.vocab_size + 1, c.n_embd)  # + the mask token (mask mode)
        self.text_pos = nn.Parameter(torch.zeros(c.text_len, c.n_embd))
        self.pos_t, self.pos_h, self.pos_w = (nn.Parameter(torch.zeros(n, c.n_embd)) for n in (t, h, w))
        self.blocks = nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        cos, sin = rope_tables(c.grid, c.text_len, c.n_embd // c.n_head)
        if not c.rope:  # no turn: the identity
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(('attn.proj.weight', 'mlp.2.weight')):  # GPT-2's scaled residual projections
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layer))
        for p in (self.text_pos, self.pos_t, self.pos_h, self.pos_w):
            nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, 'bias', None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    def video_pos(self):  # (N, C): positions of one clip's tokens, time-major
        t, h, w = self.config.grid
        return (self.pos_t[:, None, None] + self.pos_h[None, :, None] + self.pos_w[None, None, :]).view(t * h * w, -1)

    def embed(self, text, video):
        """text (B, L) ids, video (B, n) codes (n <= N, the clip's first tokens) -> (B, L + n, C)."""
        x_text = self.text_emb(text) + self.text_pos[:text.shape[1]]
        x_video = self.tok_emb(video) + self.video_pos()[:video.shape[1]]
        return torch.cat([x_text, x_video], 1)

    def transformer(self, x, causal: bool, start: int = 0, caches=None):
        """The blocks on x (B, S, C), the embeddings of sequence positions start .. start + S; caches: one
        dict per block for sampling with a KV cache (see Attention)."""
        rope = self.rope_cos[start:start + x.shape[1]], self.rope_sin[start:start + x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, causal, rope, None if caches is None else caches[i])
        return x

    def drop_text(self, text):
        """Replace whole captions by the unconditional prompt with probability cfg_drop."""
        drop = torch.rand(text.shape[0], 1, device=text.device) < self.config.cfg_drop
        return torch.where(drop, torch.full_like(text, self.config.pad_id), text)

    def check(self, text, codes):
        c = self.config
        if text.ndim != 2 or text.shape[1] != c.text_len:
            raise ValueError(f'text must be (B, {c.text_len}) ids, got {tuple(text.shape)}')
        if codes.ndim != 4 or tuple(codes.shape[1:]) != tuple(c.grid):
            raise ValueError(f'codes must be (B, {", ".join(map(str, c.grid))}), got {tuple(codes.shape)}')

    def forward(self, text, codes):
        """text (B, L) ids and codes (B, t, h, w) -> (logits (B, N, V), cross-entropy loss in fp32).
        ar: logits[:, i] predicts token i from the text and tokens < i; mask: loss on the masked tokens only."""
        self.check(text, codes)
        B, L = text.shape
        video = codes.reshape(B, -1)  # (B, N) time-major
        if self.training:
            text = self.drop_text(text)
        if self.config.mode == 'ar':
            x = self.transformer(self.embed(text, video[:, :-1]), causal=True)  # the last token is never an input
            logits = self.head(self.ln_f(x[:, L - 1:]))  # (B, N, V): from the last text token on
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), video.reshape(-1))
            return logits, loss
        masked = self.mask_pattern(B, video.device)  # (B, N)
        x = self.transformer(self.embed(text, torch.where(masked, self.mask_id, video)), causal=False)
        logits = self.head(self.ln_f(x[:, L:]))
        # the mean over the masked tokens, as a weighted mean over all tokens: no data-dependent shapes (compile)
        ce = F.cross_entropy(logits.float().flatten(0, 1), video.flatten(), reduction='none').view(B, -1)  # (B, N)
        total, count = (ce * masked).sum(), masked.sum()
        n_image = round(self.config.image_share * B) if self.config.grid[0] > 1 else 0  # one frame: the clip is the image
        if n_image:  # the first latent frames alone, text + h*w tokens: the image that sampling draws first
            rows = torch.arange(n_image, device=video.device) % B  # above 1, each clip's image again, other masks
            image = video[rows, :self.config.grid[1] * self.config.grid[2]]
            masked = self.mask_pattern(n_image, video.device, frames=1)
            x = self.transformer(self.embed(text[rows], torch.where(masked, self.mask_id, image)), causal=False)
            ce = F.cross_entropy(self.head(self.ln_f(x[:, L:])).float().flatten(0, 1), image.flatten(), reduction='none')
            total, count = total + (ce.view(n_image, -1) * masked).sum(), count + masked.sum()
        return logits, total / count

    def mask_pattern(self, B: int, device, frames: int | None = None) -> torch.Tensor:
        """mask mode's training pattern, (B, frames*h*w) bool, frames the clip's t (default) or 1 for images: a
        cosine-scheduled share of the tokens (at least one) is hidden. With probability prefix_prob a clip first
        keeps its first 1 .. t-1 latent frames visible and the share is of the tokens after them: the
        continuation the sliding window and image-to-video ask for. With
        probability first_prob every latent frame after the first is hidden and the share is of the first, an
        older way to train the image that sampling draws first (generate's first_steps); see image_share."""
        c, (_, h, w) = self.config, self.config.grid
        t = frames or c.grid[0]  # the clip's latent frames, or 1 for an image
        n = t * h * w
        ratio = torch.cos(torch.rand(B, 1, device=device) * math.pi / 2)
        kind = torch.rand(B, 1, device=device)
        multi = t > 1
        prefix = torch.randint(1, max(t, 2), (B, 1), device=device) * h * w
        prefix = torch.where(multi & (kind < c.prefix_prob), prefix, 0)
        later = torch.where(multi & (kind >= c.prefix_prob) & (kind < c.prefix_prob + c.first_prob), n - h * w, 0)
        k = (ratio * (n - prefix - later)).ceil().clamp(min=1) + later
        pos = torch.arange(n, device=device)
        score = torch.rand(B, n, device=device) + (pos < prefix).float() - (pos >= n - later).float()  # prefix last, later first
        return score.argsort(1).argsort(1) < k

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas, device_type: str,
                             muon: bool = False):
        """AdamW; decay the matrices (and embeddings), not biases, norms or positions. muon: the blocks' matrices
        take Muon's steps instead, momentum orthogonalised by a Newton-Schulz iteration (Keller Jordan's Muon),
        scaled to AdamW's update size so that lr and weight_decay carry over; then returns [AdamW, Muon]."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        hidden = {id(p) for n, p in named if muon and p.dim() == 2 and n.startswith('blocks.')}
        decay = {id(p) for n, p in named if p.dim() >= 2 and not n.startswith(('text_pos', 'pos_'))} - hidden
        pick = lambda keep: [p for n, p in named if keep(id(p))]
        groups = [{'params': pick(lambda i: i in decay), 'weight_decay': weight_decay},
                  {'params': pick(lambda i: i not in decay and i not in hidden), 'weight_decay': 0.0}]
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')
        if not muon:
            return adamw
        muon = torch.optim.Muon(pick(lambda i: i in hidden), lr=learning_rate, weight_decay=weight_decay,
                                adjust_lr_fn='match_rms_adamw')
        return [adamw, muon]

    def guided(self, logits, cfg: float):
        """Classifier-free guidance on a doubled batch [conditional ; unconditional]; at scale 1 the batch is
        the conditional one only."""
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
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), -float('inf'))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)

    @torch.no_grad()
    def generate(self, text, prefix=None, cfg: float | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, steps: int = 12, guide_frames: int | None = None,
                 first_steps: int | None = None, refine_steps: int | None = None, refine_cfg: float | None = None,
                 generator: torch.Generator | None = None):
        """Sample one clip of codes (B, t, h, w) for text (B, L). prefix (B, t0, h, w): latent frames that are
        given (image to video, continuation) and kept. ar: token by token with a KV cache, guided on the first
        guide_frames latent frames it makes (t or more: all); the later frames follow them with the conditional
        model alone, which lessens an unseen combination's colour drift towards a seen one. mask: `steps`
        parallel decoding steps; without a prefix the first `first_steps` of them (None: a third) draw the
        first latent frame alone, an image, and the rest continue it (0: every frame at once); then, without a
        prefix, `refine_steps` more steps redraw the first latent frame with the whole clip visible, so that it
        agrees with the later frames, which show the object's shape more sharply, guided by refine_cfg (default 1,
        the conditional model alone: the clip it sees already shows the prompt).
        cfg, temperature, guide_frames, refine_steps and refine_cfg None are the mode's defaults (SAMPLING)."""
        c = self.config
        cfg = SAMPLING[c.mode]['cfg'] if cfg is None else cfg
        temperature = SAMPLING[c.mode]['temperature'] if temperature is None else temperature
        guide_frames = SAMPLING['ar']['guide_frames'] if guide_frames is None else guide_frames
        refine_steps = SAMPLING['mask']['refine_steps'] if refine_steps is None else refine_steps
        refine_cfg = SAMPLING['mask']['refine_cfg'] if refine_cfg is None else refine_cfg
        if refine_steps < 0:
            raise ValueError(f'refine_steps must be >= 0, got {refine_steps}')
        B = text.shape[0]
        t, h, w = c.grid
        given = 0 if prefix is None else prefix.shape[1] * h * w
        if prefix is not None and (prefix.shape[0] != B or tuple(prefix.shape[2:]) != (h, w) or prefix.shape[1] > t):
            raise ValueError(f'prefix must be (B, <= {t}, {h}, {w}) codes, got {tuple(prefix.shape)}')
        video = torch.zeros(B, self.n_video, dtype=torch.long, device=text.device)
        if prefix is not None:
            video[:, :given] = prefix.reshape(B, -1)
        # guidance needs the unconditional prompt too: [conditional ; unconditional]
        pair = lambda scale: text if scale == 1.0 else torch.cat([text, torch.full_like(text, c.pad_id)])
        text2 = pair(cfg)
        if c.mode == 'ar':
            if guide_frames < 1:
                raise ValueError(f'guide_frames must be at least 1 latent frame, got {guide_frames}')
            guided_until = given + guide_frames * h * w
            self._generate_ar(text2, video, given, cfg, guided_until, temperature, top_k, top_p, generator)
            return video.view(B, t, h, w)
        first_steps = mask_first_steps(steps, first_steps)
        if given == 0 and first_steps > 0 and t > 1:  # the first latent frame alone, then the clip continues it
            first = video[:, :h * w] if c.image_share > 0 else video  # as an image, if it trained on images
            self._generate_mask(text2, first, 0, h * w, cfg, temperature, first_steps, generator)
            self._generate_mask(text2, video, h * w, self.n_video, cfg, temperature, steps - first_steps, generator)
        else:
            self._generate_mask(text2, video, given, self.n_video, cfg, temperature, steps, generator)
        if given == 0 and refine_steps > 0 and t > 1:  # redraw the first latent frame from the whole clip
            self._generate_mask(pair(refine_cfg), video, 0, h * w, refine_cfg, temperature, refine_steps, generator, see_after=True)
        return video.view(B, t, h, w)

    def _generate_ar(self, text2, video, given, cfg, guided_until, temperature, top_k, top_p, generator):
        B = video.shape[0]
        copies = text2.shape[0] // B  # 2 with guidance
        caches = [dict(size=text2.shape[1] + self.n_video - 1) for _ in self.blocks]
        x = self.embed(text2, video[:, :given].repeat(copies, 1))  # the prompt: text and given tokens at once
        pos = self.video_pos()
        for i in range(given, self.n_video):
            if i == guided_until and copies == 2:  # guidance ends: drop the unconditional half of the batch
                copies, cfg, x = 1, 1.0, x[:B]
                for cache in caches:
                    cache['k'], cache['v'] = cache['k'][:B], cache['v'][:B]
            x = self.transformer(x, causal=True, start=caches[0].get('n', 0), caches=caches)
            logits = self.guided(self.head(self.ln_f(x[:, -1])).float(), cfg)  # (B, V)
            video[:, i] = self.sample_logits(logits, temperature, top_k, top_p, generator)
            x = self.tok_emb(video[:, i:i + 1].repeat(copies, 1)) + pos[i:i + 1]  # (copies * B, 1, C)

    def _generate_mask(self, text2, video, lo, hi, cfg, temperature, steps, generator, see_after: bool = False):
        """Fill video[:, lo:hi] in `steps` parallel steps from the text and video[:, :lo]; the tokens from hi on
        stay masked, as a clip's later frames were in training, or are seen as given with see_after."""
        B, N = video.shape
        pos = torch.arange(N, device=video.device).expand(B, N)
        later = (pos >= hi) & (not see_after)
        known = (pos < lo) | ((pos >= hi) & see_after)
        copies = text2.shape[0] // B  # 2 with guidance
        for s in range(steps):
            x = self.transformer(self.embed(text2, torch.where(known, video, self.mask_id).repeat(copies, 1)), causal=False)
            logits = self.guided(self.head(self.ln_f(x[:, -N:])).float(), cfg)  # (B, N, V)
            gumbel = lambda shape: -torch.log(-torch.log(torch.rand(shape, generator=generator, device=logits.device)
                                                         .clamp(1e-20, 1)))
            sample = (logits / temperature + gumbel(logits.shape)).argmax(-1) if temperature > 0 else logits.argmax(-1)
            # keep the most confident tokens, the confidence perturbed by Gumbel noise that fades over the steps
            # (MaskGIT's choice temperature): without it the background is always surest and objects never start
            conf = logits.log_softmax(-1).gather(-1, sample[..., None]).squeeze(-1)
            if temperature > 0:
                conf = conf + CHOICE_TEMPERATURE * (1 - (s + 1) / steps) * gumbel(conf.shape)
            conf = conf.masked_fill(known, float('inf')).masked_fill(later, -float('inf'))  # given stay, later wait
            # after step s, cos(pi/2 * (s+1)/steps) of the free tokens are still masked
            n_masked = int(math.floor((hi - lo) * math.cos(math.pi / 2 * (s + 1) / steps)))
            video.copy_(torch.where(known | later, video, sample))
            remask = torch.zeros_like(known)
            remask.scatter_(1, conf.topk(n_masked + (0 if see_after else N - hi), largest=False).indices, True)
            known = ~remask
