import pytest
import torch

from prior import Muon, Prior, PriorConfig, attend, rope_table, rotate

TINY = dict(vocab_size=30, text_vocab=20, text_len=4, grid=(3, 2, 2), n_layer=2, n_head=2, n_embd=32)


def batch(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 20, (B, 4), generator=g), torch.randint(0, 30, (B, 3, 2, 2), generator=g)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_ar_is_causal():
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, cfg_drop=0.0)).eval()
    text, codes = batch()
    logits, _ = m(codes, text)
    changed = codes.clone().view(2, -1)
    changed[:, 7:] = (changed[:, 7:] + 1) % 30  # change tokens 7.. : logits 0..7 predict tokens 0..7 from < 7
    logits2, _ = m(changed.view_as(codes), text)
    assert torch.allclose(logits[:, :8], logits2[:, :8], atol=1e-5)
    assert not torch.allclose(logits[:, 8:], logits2[:, 8:], atol=1e-3)


def test_rope_depends_on_the_offset_only():
    grid, L, hd = (3, 4, 5), 2, 16
    rope = rope_table(grid, L, hd)
    q, k = torch.randn(2, hd, generator=seeded())
    pos = lambda t, h, w: L + (t * grid[1] + h) * grid[2] + w

    def dot(i, j):
        return (rotate(q, rope[i]) * rotate(k, rope[j])).sum()
    # the same (t, h, w) offset at two places: the same score; another offset: another score
    assert torch.allclose(dot(pos(0, 1, 2), pos(1, 3, 1)), dot(pos(1, 0, 3), pos(2, 2, 2)), atol=1e-5)
    for other in (pos(1, 3, 2), pos(1, 2, 1), pos(0, 3, 1)):  # one axis moved
        assert not torch.allclose(dot(pos(0, 1, 2), pos(1, 3, 1)), dot(pos(0, 1, 2), other), atol=1e-3)
    # text is not turned; a turn keeps the norm
    assert torch.equal(rotate(q, rope[1]), q) and torch.allclose(rotate(q, rope[L + 5]).norm(), q.norm())
    # the pairs are neighbouring channels (2i, 2i + 1), as in the checkpoints trained so far
    (c, s), want = rope[L + 7].unbind(-1), torch.empty_like(q)
    want[0::2], want[1::2] = q[0::2] * c - q[1::2] * s, q[1::2] * c + q[0::2] * s
    assert torch.allclose(rotate(q, rope[L + 7]), want, atol=1e-6)
    # in bfloat16 the turn is computed in float32 and rounded once
    q16 = q.bfloat16()
    assert torch.equal(rotate(q16, rope[L + 7]), rotate(q16.float(), rope[L + 7]).bfloat16())


@pytest.mark.parametrize('causal, n_query', [(False, 9), (True, 9), (False, 1), (True, 1), (True, 5)])
def test_bfloat16_attention_on_cpu_matches_sdpa(causal, n_query):
    # in bfloat16 on CPU attend() is a plain matmul-softmax-matmul for several queries (SDPA for one): the same
    # values and gradients.
    # causal with fewer queries than keys: the queries are the last positions (context rows come first)
    g = seeded()
    q = torch.randn(2, 3, n_query, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, 9, 16, generator=g, requires_grad=True) for _ in range(2))
    sees = torch.ones(n_query, 9, dtype=torch.bool).tril(9 - n_query) if causal else None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sees)
    assert torch.allclose(attend(q, k, v, causal), ref, atol=1e-5)  # float32: SDPA, the same alignment
    out = attend(*(t.bfloat16() for t in (q, k, v)), causal)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=0.03)
    for a, b in zip(torch.autograd.grad(ref.sum(), (q, k, v)), torch.autograd.grad(out.float().sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=0.05)
    if causal and n_query > 1:  # the last query's value changes with the last key; the first query's does not
        v2 = v.detach().clone()
        v2[:, :, -1] += 1
        out2 = attend(q.bfloat16(), k.bfloat16(), v2.bfloat16(), causal)
        assert torch.equal(out2[:, :, 0], out[:, :, 0]) and not torch.equal(out2[:, :, -1], out[:, :, -1])


def test_bfloat16_kv_cache_query_takes_sdpa_on_cpu(monkeypatch):
    # a KV cache's one query goes through SDPA in bfloat16 (1.4-1.8x faster sampling), several queries do not
    # while they train
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    counted = lambda *a, **kw: calls.append(1) or sdpa(*a, **kw)
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', counted)
    k, v = (torch.randn(2, 3, 9, 16).bfloat16() for _ in range(2))
    attend(torch.randn(2, 3, 1, 16).bfloat16(), k, v, True)
    assert calls == [1]
    attend(torch.randn(2, 3, 5, 16).bfloat16(), k, v, True)
    assert calls == [1]
    with torch.no_grad():  # without gradients (sampling, validation) SDPA's forward is the faster
        attend(torch.randn(2, 3, 5, 16).bfloat16(), k, v, True)
    assert calls == [1, 1]


@pytest.mark.parametrize('cfg, given, guide_frames, text_context', [
    (1.0, 0, 1, True), (2.5, 0, 3, True), (2.5, 0, 1, True), (2.5, 1, 1, True), (2.5, 0, 1, False), (2.5, 1, 1, False)])
def test_kv_cache_equals_full_recompute(cfg, given, guide_frames, text_context):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, text_context=text_context)).eval()
    text, prefix = batch()
    x = prefix[:, :given] if given else None
    codes = m.sample(text, x, cfg=cfg, temperature=0, guide_frames=guide_frames)  # greedy, cached
    assert torch.equal(m.sample(text, x, cfg=cfg, temperature=0, guide_frames=guide_frames, kv_cache=False), codes)
    # greedy from forward's logits must pick the same tokens: guided on the first guide_frames latent frames
    # made, the conditional model alone after them
    cond, uncond = m(codes.repeat(2, 1, 1, 1), torch.cat([text, torch.zeros_like(text)]))[0].chunk(2)
    n, end = given * 4, (given + guide_frames) * 4  # 2 x 2 tokens per latent frame
    full = torch.cat([(uncond + cfg * (cond - uncond))[:, :end], cond[:, end:]], 1)
    assert torch.equal(full.argmax(-1)[:, n:], codes.view(2, -1)[:, n:])
    assert torch.equal(codes[:, :given], prefix[:, :given])


def test_text_layers_read_the_whole_prompt_and_keep_the_cache_exact():
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, text_layers=1, cfg_drop=0.0)).eval()
    text, codes = batch()
    logits, _ = m(codes, text)
    later = text.clone()
    later[:, -1] = (later[:, -1] + 1) % 20  # the last word changes what the first text position carries
    first = [m.embed(t, codes.view(2, -1))[1][:, 0] for t in (text, later)]  # the context's first row
    assert not torch.allclose(*first)
    sample = m.sample(text, cfg=2.0, temperature=0, guide_frames=1)
    assert torch.equal(m.sample(text, cfg=2.0, temperature=0, guide_frames=1, kv_cache=False), sample)
    muon = m.configure_optimizers('cpu')[1].param_groups[0]['params']
    assert any(p is m.text_blocks[0].attn.qkv.weight for p in muon)  # their matrices take Muon's steps
    old = {'config': {k: v for k, v in m.config.__dict__.items() if k not in ('text_layers', 'text_context')},
           'model': Prior(PriorConfig(**TINY, text_layers=0)).state_dict()}
    assert Prior.from_checkpoint(old).config.text_layers == 0  # a checkpoint from before them loads without
    joint = Prior(PriorConfig(**TINY, text_layers=1, text_context=False))  # text rows through the blocks
    old = {'config': {k: v for k, v in joint.config.__dict__.items() if k != 'text_context'},
           'model': joint.state_dict()}
    assert not Prior.from_checkpoint(old).config.text_context  # ... and so does one from before the context


@pytest.mark.parametrize('mode', ['ar', 'mask'])
def test_text_context_is_read_not_updated(mode):
    # with text_context the blocks run on the video rows only: the loss is the joint layout's with the text
    # rows' queries, MLPs and predictions cut out; a block's output for the text is never computed
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode=mode, text_layers=1, cfg_drop=0.0)).eval()
    assert m.config.text_context  # the default with text layers
    text, codes = batch()
    x, context, start = m.embed(text, codes.view(2, -1)[:, :-1] if mode == 'ar' else codes.view(2, -1))
    assert context.shape == (2, 4, 32) and start == (3 if mode == 'ar' else 4) and x.shape[1] == 12
    seen = []
    hook = m.blocks[0].mlp.register_forward_hook(lambda mod, i, o: seen.append(o.shape[1]))
    logits, loss = m(codes, text)
    hook.remove()
    assert seen[0] == 12  # the clip's video rows (with the text: 16); mask's images come after
    assert logits.shape == (2, 12, 30) and torch.isfinite(loss)
    later = text.clone()
    later[:, -1] = (later[:, -1] + 1) % 20
    assert not torch.allclose(m(codes, later)[0], logits)  # the video rows read the text


@pytest.mark.parametrize('mode', ['ar', 'mask'])
def test_guidance_scales(mode):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode=mode)).eval()
    text, _ = batch()
    pads = torch.zeros_like(text)  # pad_id 0: the unconditional prompt
    # ar: guide every frame; mask: no redraw, which follows refine_cfg and not cfg
    settings = dict(guide_frames=3) if mode == 'ar' else dict(steps=4, refine_steps=0)
    greedy = lambda t, cfg: m.sample(t, cfg=cfg, temperature=0, **settings)
    # scale 1 is the conditional model alone: it skips the unconditional half, which must change nothing
    cond = greedy(text, 1.0)
    assert torch.equal(greedy(text, 1.0 + 1e-6), cond)
    if mode == 'ar':
        assert torch.equal(m(cond, text)[0].argmax(-1), cond.view(2, -1))
    # scale 0 is the unconditional model alone
    assert torch.equal(greedy(text, 0.0), greedy(pads, 1.0))
    assert not torch.equal(greedy(text, 5.0), cond)


def test_ar_new_prompt_guides_every_frame():
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY)).eval()
    text, codes = batch()
    turn = m.sample(text, codes[:, :1], cfg=10.0, temperature=0, new_prompt=True)
    assert torch.equal(turn, m.sample(text, codes[:, :1], cfg=10.0, temperature=0, guide_frames=3))
    assert not torch.equal(turn, m.sample(text, codes[:, :1], cfg=10.0, temperature=0))  # guided on one frame only


@pytest.mark.parametrize('mode', ['ar', 'mask'])
def test_given_frames_are_kept_and_every_token_filled(mode):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode=mode)).eval()
    text, codes = batch()
    out = m.sample(text, codes[:, :1], generator=seeded())
    assert out.shape == codes.shape and torch.equal(out[:, :1], codes[:, :1])
    assert out.min() >= 0 and out.max() < 30  # no mask token left
    again = m.sample(text, codes[:, :1], generator=seeded())
    assert torch.equal(out, again)  # a seed reproduces a sample
    with pytest.raises(ValueError, match=r'x must be \(B, <= 3, 2, 2\) codes'):
        m.sample(text, codes[:, :, :1])


def test_mask_draws_the_first_latent_frame_as_an_image():
    # drawn as an image, the first latent frame never sees the positions of the later frames; drawn inside the
    # whole clip (first_steps 0, or a prior that never trained on images) it does
    torch.manual_seed(0)
    text, _ = batch()

    def first_frames(image_share, first_steps, shift):
        torch.manual_seed(0)
        # no text layers: at this size their text keys leave the later positions too small a pull to flip a token
        m = Prior(PriorConfig(**TINY, mode='mask', image_share=image_share, text_layers=0)).eval()
        with torch.no_grad():  # (a constant shift would vanish in the LayerNorm)
            m.pos_t[1:] += shift * torch.randn(m.pos_t[1:].shape, generator=seeded(1))
        out = m.sample(text, steps=6, first_steps=first_steps, refine_steps=0, generator=seeded())
        return out[:, 0], out[:, 1:]
    first, later = first_frames(1.0, 2, 0.0)
    first2, later2 = first_frames(1.0, 2, 3.0)
    assert torch.equal(first, first2) and not torch.equal(later, later2)
    for image_share, first_steps in ((1.0, 0), (0.0, 2)):
        assert not torch.equal(first_frames(image_share, first_steps, 0.0)[0], first_frames(image_share, first_steps, 3.0)[0])


def test_mask_redraws_only_the_first_latent_frame():
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode='mask')).eval()
    text, codes = batch(B=8)
    plain = m.sample(text, steps=4, refine_steps=0, generator=seeded())
    redrawn = m.sample(text, steps=4, refine_steps=3, generator=seeded())
    assert torch.equal(redrawn[:, 1:], plain[:, 1:]) and not torch.equal(redrawn[:, 0], plain[:, 0])
    # a given first frame is kept, never redrawn
    kept = m.sample(text, codes[:, :1], steps=4, refine_steps=3, generator=seeded())
    assert torch.equal(kept, m.sample(text, codes[:, :1], steps=4, refine_steps=0, generator=seeded()))


@pytest.mark.parametrize('mode, kw, words', [
    ('ar', dict(steps=4), 'steps is a setting of mask priors'),
    ('mask', dict(guide_frames=2), 'guide_frames is a setting of ar priors'),
    ('ar', dict(guide_frames=0), 'guide_frames must be at least 1'),
    ('ar', dict(top_p=1.5), 'top_p must be in (0, 1]'),
    ('mask', dict(steps=3, first_steps=3), 'first_steps must be in [0, steps)'),
    ('mask', dict(refine_steps=-1), 'refine_steps must be >= 0'),
    ('mask', dict(temperature=-1.0), 'temperature must be >= 0'),
    ('mask', dict(eta=0.5), 'eta is not a sampling setting'),
])
def test_sampling_settings_are_checked_in_one_place(mode, kw, words):
    m = Prior(PriorConfig(**TINY, mode=mode))
    with pytest.raises(ValueError) as e:
        m.sample(batch()[0], **kw)
    assert words in str(e.value)
    assert m.settings(cfg=None)['cfg'] == 2.0  # None means the default
    assert mode == 'ar' or m.settings(steps=9)['first_steps'] == 3  # mask: a third of the steps draw the first frame


@pytest.mark.parametrize('prefix_prob', [0.0, 0.5, 1.0])
def test_mask_pattern_hides_a_share_and_never_a_kept_prefix(prefix_prob):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode='mask', prefix_prob=prefix_prob))
    masked = m.mask_pattern(4000, 'cpu').view(4000, 3, 4)  # grid (3, 2, 2): frames of 4 tokens
    assert masked.flatten(1).sum(1).min() >= 1  # at least one token to learn from
    share = 1 - masked[:, 0].any(1).float().mean().item()  # clips that hide nothing of the first latent frame
    # without a prefix, frame 0 keeps all 4 tokens only when few are hidden (~15 % of clips here)
    if prefix_prob == 0.0:
        assert share < 0.25
    else:  # a prefix keeps 1 or 2 whole frames and hides at least one token after them
        assert abs(share - prefix_prob) < 0.2
        kept_two = ~masked[:, :2].flatten(1).any(1)
        assert masked[kept_two, 2].any(1).all()
    if prefix_prob == 1.0:
        assert not masked[:, 0].any()
    image = m.mask_pattern(1000, 'cpu', frames=1)  # the first frames trained again as images: no prefix
    assert image.shape == (1000, 4) and image.sum(1).min() >= 1
    assert abs(image.float().mean().item() - 0.7) < 0.05  # ceil(4 cos(pi/2 u)) / 4 has mean about 0.7


@pytest.mark.parametrize('mode, optimizer', [('ar', 'adamw'), ('mask', 'muon')])
def test_overfit_one_batch_and_sample_it_back(mode, optimizer):
    torch.manual_seed(0)
    # mask with image training: greedy sampling draws each clip's first frame as an image, then the rest
    m = Prior(PriorConfig(**TINY, mode=mode, cfg_drop=0.0, optimizer=optimizer, lr=3e-3, weight_decay=0.0))
    text, codes = batch()
    opts = m.configure_optimizers('cpu')
    if optimizer == 'muon':  # Muon takes the blocks' matrices (text blocks too), AdamW everything else, each once
        adamw, muon = ({id(p) for g in o.param_groups for p in g['params']} for o in opts)
        blocks = ('blocks.', 'text_blocks.')
        assert muon == {id(p) for n, p in m.named_parameters() if n.startswith(blocks) and p.dim() == 2}
        assert not adamw & muon and len(adamw | muon) == len(list(m.parameters()))
    first = m(codes, text)[1].item()
    for _ in range(200):
        _, loss = m(codes, text)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    assert loss.item() < 0.1 * first
    m.eval()
    settings = dict(cfg=1.0, temperature=0) if mode == 'ar' else dict(cfg=1.0, temperature=0, steps=6, first_steps=2)
    assert torch.equal(m.sample(text, **settings), codes)  # it learnt both clips by heart
    with torch.autocast('cpu', torch.bfloat16):  # and bfloat16 sampling (ar: the KV cache) draws them the same
        assert torch.equal(m.sample(text, **dict(settings, temperature=1.0), generator=seeded()), codes)
        many = text.repeat(8, 1)  # 16 videos, which ar's KV cache decodes in bfloat16 (fewer in float32)
        assert torch.equal(m.sample(many, **settings), codes.repeat(8, 1, 1, 1))


@pytest.mark.parametrize('videos,kv_cache,dtype', [(2, True, torch.float32), (16, True, torch.bfloat16),
                                                   (2, False, torch.bfloat16)])
def test_ar_decodes_few_videos_in_float32_on_cpu(videos, kv_cache, dtype):
    # a bfloat16 matmul of a few rows is slower on CPU than a float32 one: under bfloat16 autocast fewer than
    # 16 videos decode token by token in float32; more, or without the cache (whole sequences), in bfloat16
    m = Prior(PriorConfig(**TINY)).eval()
    seen, logits = [], m.logits
    m.logits = lambda x: seen.append(logits(x).dtype) or logits(x)
    with torch.autocast('cpu', torch.bfloat16):
        m.sample(torch.randint(TINY['text_vocab'], (videos, TINY['text_len'])), cfg=1.0, kv_cache=kv_cache)
    assert set(seen) == {dtype}


def test_bad_config():
    with pytest.raises(ValueError, match="'ar' or 'mask'"):
        Prior(PriorConfig(mode='diffusion'))
    with pytest.raises(ValueError, match='must be even'):
        Prior(PriorConfig(**dict(TINY, n_embd=30)))  # head size 15
    Prior(PriorConfig(**dict(TINY, n_embd=30), rope=False))
    with pytest.raises(ValueError, match="'adamw' or 'muon'"):
        Prior(PriorConfig(**TINY, optimizer='sgd'))
    with pytest.raises(ValueError, match='text_layers -2 is a number of blocks'):
        Prior(PriorConfig(**TINY, text_layers=-2))
    assert [PriorConfig(mode=m).lr for m in ('ar', 'mask')] == [6e-3, 3e-3]  # lr 0: the mode's
    assert [PriorConfig(mode=m).max_iters for m in ('ar', 'mask')] == [2000, 2500]
    m = Prior(PriorConfig(**TINY))
    text, codes = batch()
    with pytest.raises(ValueError, match='text must be'):
        m(codes, text[:, :3])
    with pytest.raises(ValueError, match='codes must be'):
        m(codes[:, :2], text)


def test_muon_takes_torch_muons_steps_in_batches():
    # the matrices of one shape (a tall one transposed) are orthogonalised together: the same steps as
    # torch.optim.Muon's one by one, with its scale to AdamW's size and decoupled weight decay
    g = seeded()
    shapes = [(6, 10), (10, 6), (6, 10), (8, 8), (3, 5)]
    mine = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    starts = [p.detach().clone() for p in mine]
    opts = [Muon(mine, lr=0.01, weight_decay=0.1),
            torch.optim.Muon(ref, lr=0.01, weight_decay=0.1, adjust_lr_fn='match_rms_adamw')]
    for _ in range(3):
        grads = [torch.randn(*s, generator=g) for s in shapes]
        for p, q, grad in zip(mine, ref, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        for o in opts:
            o.step()
    for p, q, start in zip(mine, ref, starts):
        assert torch.allclose(p, q, atol=1e-6) and not torch.allclose(p, start)
    assert set(opts[0].state[mine[0]]) == {'momentum_buffer'}  # the state torch's Muon saves: old checkpoints resume
    with pytest.raises(ValueError, match='2-D'):
        Muon([torch.nn.Parameter(torch.ones(3))], lr=0.01)
    assert opts[0].step(lambda: torch.tensor(2.0)) == 2.0  # a closure's loss comes back, as from torch's optimizers


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['ar', 'mask'])
def test_compiled_training_step_matches_eager(mode):
    import torch._inductor.config as inductor_config
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode=mode))  # training mode: text dropout and, in mask mode, random masks
    text, codes = batch(B=4)
    torch.manual_seed(1)
    _, eager = m(codes, text)
    with inductor_config.patch(fallback_random=True):  # the compiled graph draws the same random numbers as eager
        torch.manual_seed(1)
        _, loss = torch.compile(m)(codes, text)
    assert torch.allclose(loss, eager, rtol=1e-4), (loss, eager)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
