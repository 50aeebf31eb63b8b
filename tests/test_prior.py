import os
import shutil
import subprocess
import sys

import pytest
import torch

from prior import SAMPLING, Prior, PriorConfig, attend, rope_tables, rotate

TINY = dict(vocab_size=30, text_vocab=20, text_len=4, grid=(3, 2, 2), n_layer=2, n_head=2, n_embd=32)


def batch(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 20, (B, 4), generator=g), torch.randint(0, 30, (B, 3, 2, 2), generator=g)


def test_ar_is_causal():
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, cfg_drop=0.0)).eval()
    text, codes = batch()
    logits, _ = m(text, codes)
    changed = codes.clone().view(2, -1)
    changed[:, 7:] = (changed[:, 7:] + 1) % 30  # change tokens 7.. : logits 0..7 predict tokens 0..7 from < 7
    logits2, _ = m(text, changed.view_as(codes))
    assert torch.allclose(logits[:, :8], logits2[:, :8], atol=1e-5)
    assert not torch.allclose(logits[:, 8:], logits2[:, 8:], atol=1e-3)


def test_rope_depends_on_the_offset_only():
    grid, L, hd = (3, 4, 5), 2, 16
    cos, sin = rope_tables(grid, L, hd)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, hd, generator=g)
    pos = lambda t, h, w: L + (t * grid[1] + h) * grid[2] + w

    def dot(i, j):
        return (rotate(q, cos[i], sin[i]) * rotate(k, cos[j], sin[j])).sum()
    # the same (t, h, w) offset at two places: the same score; another offset: another score
    assert torch.allclose(dot(pos(0, 1, 2), pos(1, 3, 1)), dot(pos(1, 0, 3), pos(2, 2, 2)), atol=1e-5)
    for other in (pos(1, 3, 2), pos(1, 2, 1), pos(0, 3, 1)):  # one axis moved
        assert not torch.allclose(dot(pos(0, 1, 2), pos(1, 3, 1)), dot(pos(0, 1, 2), other), atol=1e-3)
    # text is not turned; a turn keeps the norm
    assert torch.equal(rotate(q, cos[1], sin[1]), q) and torch.allclose(rotate(q, cos[L + 5], sin[L + 5]).norm(), q.norm())
    # the pairs are neighbouring channels (2i, 2i + 1), as in the checkpoints trained so far
    c, s, want = cos[L + 7], sin[L + 7], torch.empty_like(q)
    want[0::2], want[1::2] = q[0::2] * c - q[1::2] * s, q[1::2] * c + q[0::2] * s
    assert torch.allclose(rotate(q, c, s), want, atol=1e-6)


@pytest.mark.parametrize('causal, n_query', [(False, 9), (True, 9), (False, 1)])
def test_bfloat16_attention_on_cpu_matches_sdpa(causal, n_query):
    # in bfloat16 on CPU attend() is a plain matmul-softmax-matmul, not SDPA: the same values and gradients
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, n_query, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, 9, 16, generator=g, requires_grad=True) for _ in range(2))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = attend(*(t.bfloat16() for t in (q, k, v)), causal)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=0.03)
    grads = torch.autograd.grad(ref.sum(), (q, k, v))
    grads_bf16 = torch.autograd.grad(out.float().sum(), (q, k, v))
    for a, b in zip(grads, grads_bf16):
        assert torch.allclose(a, b, atol=0.05)
    if causal:  # the last query's value changes with the last key; the first query's does not
        v2 = v.detach().clone()
        v2[:, :, -1] += 1
        out2 = attend(q.bfloat16(), k.bfloat16(), v2.bfloat16(), causal)
        assert torch.equal(out2[:, :, 0], out[:, :, 0]) and not torch.equal(out2[:, :, -1], out[:, :, -1])


@pytest.mark.parametrize('cfg, given, guide_frames', [(1.0, 0, 1), (2.5, 0, 3), (2.5, 0, 1), (2.5, 1, 1)])
def test_kv_cache_logits_equal_full_recompute(cfg, given, guide_frames):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY)).eval()
    text, prefix = batch()
    codes = m.generate(text, prefix=prefix[:, :given] if given else None, cfg=cfg, temperature=0,
                       guide_frames=guide_frames)  # greedy, cached
    # greedy from the full recompute must pick the same tokens: guided on the first guide_frames latent
    # frames made, the conditional model alone after them
    cond, uncond = m(torch.cat([text, torch.zeros_like(text)]), codes.repeat(2, 1, 1, 1))[0].chunk(2)
    n, end = given * 4, (given + guide_frames) * 4  # 2 x 2 tokens per latent frame
    full = torch.cat([(uncond + cfg * (cond - uncond))[:, :end], cond[:, end:]], 1)
    assert torch.equal(full.argmax(-1)[:, n:], codes.view(2, -1)[:, n:])
    assert torch.equal(codes[:, :given], prefix[:, :given])


@pytest.mark.parametrize('mode', ['ar', 'mask'])
def test_guidance_scales(mode):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode=mode)).eval()
    text, _ = batch()
    pads = torch.zeros_like(text)  # pad_id 0: the unconditional prompt
    # ar: guide every frame; mask: no redraw, which follows SAMPLING['mask']['refine_cfg'] and not cfg
    greedy = lambda t, cfg: m.generate(t, cfg=cfg, temperature=0, steps=4, guide_frames=3, refine_steps=0)
    # scale 1 is the conditional model alone: it skips the unconditional half, which must change nothing
    cond = greedy(text, 1.0)
    assert torch.equal(greedy(text, 1.0 + 1e-6), cond)
    if mode == 'ar':
        assert torch.equal(m(text, cond)[0].argmax(-1), cond.view(2, -1))
    # scale 0 is the unconditional model alone
    assert torch.equal(greedy(text, 0.0), greedy(pads, 1.0))
    assert not torch.equal(greedy(text, 5.0), cond)


@pytest.mark.parametrize('mode', ['ar', 'mask'])
def test_prefix_is_kept_and_every_token_filled(mode):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode=mode)).eval()
    text, codes = batch()
    out = m.generate(text, prefix=codes[:, :1], steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == codes.shape and torch.equal(out[:, :1], codes[:, :1])
    assert out.min() >= 0 and out.max() < 30  # no mask token left


@pytest.mark.parametrize('first_steps, image_share', [(0, 1.0), (2, 1.0), (2, 0.0)])
def test_mask_draws_the_first_latent_frame_first(first_steps, image_share):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode='mask', image_share=image_share)).eval()
    text, _ = batch()
    inputs, embed = [], m.embed
    m.embed = lambda t, v: (inputs.append(v.clone()), embed(t, v))[1]  # the video tokens each pass sees
    out = m.generate(text, steps=6, first_steps=first_steps, refine_steps=0,
                     generator=torch.Generator().manual_seed(0)).view(2, -1)
    assert len(inputs) == 6 and out.max() < 30  # one forward pass per step, every token filled
    later_hidden = [bool((v[:, 4:] == m.mask_id).all()) for v in inputs]  # grid (3, 2, 2): frame 0 is 4 tokens
    if first_steps:  # frame 0 alone while the later frames wait, then kept as the clip's given first frame
        assert later_hidden == [True] * 3 + [False] * 3  # the first pass of the rest sees frame 0 only
        # a model that trained on first frames as images draws frame 0 as one: text + its 4 tokens alone
        assert [v.shape[1] for v in inputs] == [4 if image_share else 12] * 2 + [12] * 4
        assert all(torch.equal(v[:, :4], out[:, :4].repeat(2, 1)) for v in inputs[2:])  # guided: doubled batch
    else:
        assert later_hidden[0] and not later_hidden[-1]  # every frame from the first pass on
    with pytest.raises(ValueError, match=r'first_steps must be in \[0, steps\)'):
        m.generate(text, steps=3, first_steps=3)


def test_mask_redraws_the_first_latent_frame_from_the_whole_clip(monkeypatch):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode='mask')).eval()
    text, codes = batch()
    inputs, embed = [], m.embed
    m.embed = lambda t, v: (inputs.append(v.clone()), embed(t, v))[1]
    out = m.generate(text, steps=4, first_steps=2, refine_steps=3, generator=torch.Generator().manual_seed(0)).view(2, -1)
    assert len(inputs) == 4 + 3 and out.max() < 30
    before = inputs[4][:2]  # the first redraw pass: frame 0 (4 tokens) masked again, the clip after it as made
    assert (before[:, :4] == m.mask_id).all() and torch.equal(before[:, 4:], out[:, 4:])
    assert all(torch.equal(v[:2, 4:], out[:, 4:]) for v in inputs[4:])  # the later frames stay as they are
    assert [int((v[:2, :4] == m.mask_id).sum()) for v in inputs[4:]] == [8, 6, 4]  # cosine schedule: 4, 3, 2 of 4 per clip
    assert [len(v) for v in inputs] == [4] * 4 + [2] * 3  # guided [cond ; uncond] passes, an unguided redraw
    inputs.clear()
    monkeypatch.setitem(SAMPLING['mask'], 'refine_cfg', 2.0)  # a guided redraw doubles its batch too
    m.generate(text, steps=4, first_steps=2, refine_steps=3, generator=torch.Generator().manual_seed(0))
    assert [len(v) for v in inputs] == [4] * 7
    inputs.clear()  # a given first frame is kept, not redrawn
    out = m.generate(text, prefix=codes[:, :1], steps=4, refine_steps=3, generator=torch.Generator().manual_seed(0))
    assert len(inputs) == 4 and torch.equal(out[:, :1], codes[:, :1])
    with pytest.raises(ValueError, match='refine_steps must be >= 0'):
        m.generate(text, steps=3, refine_steps=-1)


@pytest.mark.parametrize('prefix_prob', [0.0, 0.5, 1.0])
def test_mask_pattern_hides_a_share_and_never_a_kept_prefix(prefix_prob):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode='mask', prefix_prob=prefix_prob, first_prob=0.0))
    masked = m.mask_pattern(4000, 'cpu').view(4000, 3, 4)  # grid (3, 2, 2): frames of 4 tokens
    assert masked.flatten(1).sum(1).min() >= 1  # at least one token to learn from
    first = masked[:, 0].any(1)  # clips that hide anything in the first latent frame had no prefix
    share = 1 - first.float().mean().item()
    # without a prefix, frame 0 keeps all 4 tokens only when few are hidden (~15 % of clips here)
    if prefix_prob == 0.0:
        assert share < 0.25
    else:  # a prefix keeps 1 or 2 whole frames and hides at least one token after them
        assert abs(share - prefix_prob) < 0.2
        kept_two = ~masked[:, :2].flatten(1).any(1)
        assert masked[kept_two, 2].any(1).all()
    if prefix_prob == 1.0:
        assert not masked[:, 0].any()


def test_mask_pattern_can_hide_every_frame_after_the_first():
    def shares(first_prob):
        torch.manual_seed(0)
        m = Prior(PriorConfig(**TINY, mode='mask', prefix_prob=0.25, first_prob=first_prob))
        masked = m.mask_pattern(4000, 'cpu').view(4000, 3, 4)
        # frame 0 partly visible, every later frame hidden: the first steps of sampling (first_steps)
        first = (masked[:, 1:].flatten(1).all(1) & ~masked[:, 0].all(1)).float().mean().item()
        return first, (~masked[:, 0].any(1)).float().mean().item()  # and the clips with a kept prefix
    # by chance ~10 % of the clips without a prefix (12 tokens here); with first_prob 0.5 half of the clips
    # hide the later frames and show part of frame 0 when its share cos(pi/2 u) is below 3/4 (54 %): 0.27 more
    (none, prefix0), (half, prefix1) = shares(0.0), shares(0.5)
    assert none < 0.1 and 0.25 < half < 0.36
    assert abs(prefix0 - 0.3) < 0.05 and abs(prefix1 - 0.3) < 0.05  # the prefix share stays (0.25 + by chance)
    with pytest.raises(ValueError, match='together at most 1'):
        Prior(PriorConfig(**TINY, mode='mask', prefix_prob=0.6, first_prob=0.5))


def test_mask_trains_first_frames_as_images():
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode='mask', image_share=0.5))  # training mode
    text, codes = batch(B=4)
    shapes, transformer = [], m.transformer
    m.transformer = lambda x, causal: (shapes.append((tuple(x.shape[:2]), causal)), transformer(x, causal))[1]
    _, loss = m(text, codes)
    assert shapes == [((4, 4 + 12), False), ((2, 4 + 4), False)]  # the clips, then half of their first frames alone
    assert torch.isfinite(loss)
    masked = m.mask_pattern(1000, 'cpu', frames=1)
    assert masked.shape == (1000, 4) and masked.sum(1).min() >= 1
    assert abs(masked.float().mean().item() - 0.7) < 0.05  # ceil(4 cos(pi/2 u)) / 4 has mean about 0.7
    shapes.clear()
    m.config.image_share = 0.0
    m(text, codes)
    assert shapes == [((4, 16), False)]
    m = Prior(PriorConfig(**dict(TINY, grid=(1, 2, 2)), mode='mask'))  # one latent frame: no second pass
    shapes.clear()
    transformer = m.transformer
    m.transformer = lambda x, causal: (shapes.append((tuple(x.shape[:2]), causal)), transformer(x, causal))[1]
    m(text, codes[:, :1])
    assert shapes == [((4, 8), False)]
    with pytest.raises(ValueError, match='image_share'):
        Prior(PriorConfig(**TINY, mode='mask', image_share=-1))


def test_mask_image_share_above_one_repeats_each_clips_image_with_other_masks():
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode='mask', image_share=2.0, cfg_drop=0.0))
    text, codes = batch(B=3)
    inputs, embed = [], m.embed
    m.embed = lambda t, v: (inputs.append((t, v)), embed(t, v))[1]
    m(text, codes)
    _, (t_img, v_img) = inputs  # the clips' pass, then the images'
    assert v_img.shape == (6, 4) and torch.equal(t_img, text.repeat(2, 1))  # clips 0 1 2 0 1 2, first frames
    first = codes[:, 0].reshape(3, -1).repeat(2, 1)
    shown = v_img != m.mask_id
    assert torch.equal(v_img[shown], first[shown]) and (~shown).any(1).all()
    assert not torch.equal(shown[:3], shown[3:])  # each copy hides its own tokens


@pytest.mark.parametrize('mode, muon', [('ar', False), ('mask', False), ('mask', True)])
def test_overfit_one_batch(mode, muon):
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode=mode, cfg_drop=0.0))
    text, codes = batch()
    opts = m.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu', muon=muon)
    opts = opts if muon else [opts]
    if muon:  # Muon takes the blocks' matrices, AdamW everything else, each parameter once
        adamw, muon_opt = ({id(p) for g in o.param_groups for p in g['params']} for o in opts)
        assert muon_opt == {id(p) for n, p in m.named_parameters() if n.startswith('blocks.') and p.dim() == 2}
        assert not adamw & muon_opt and len(adamw | muon_opt) == len(list(m.parameters()))
    first = m(text, codes)[1].item()
    for _ in range(150):
        _, loss = m(text, codes)
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
    assert loss.item() < 0.2 * first
    if mode == 'ar':
        m.eval()
        assert torch.equal(m.generate(text, cfg=1.0, temperature=0), codes)  # it learnt both clips by heart


def test_bad_inputs():
    with pytest.raises(ValueError, match="'ar' or 'mask'"):
        Prior(PriorConfig(mode='diffusion'))
    with pytest.raises(ValueError, match='must be even'):
        Prior(PriorConfig(**dict(TINY, n_embd=30)))  # head size 15
    Prior(PriorConfig(**dict(TINY, n_embd=30), rope=False))
    m = Prior(PriorConfig(**TINY))
    text, codes = batch()
    with pytest.raises(ValueError, match='text must be'):
        m(text[:, :3], codes)
    with pytest.raises(ValueError, match='codes must be'):
        m(text, codes[:, :2])


def test_imports_alone(tmp_path):
    shutil.copy(os.path.join(os.path.dirname(__file__), '..', 'prior.py'), tmp_path)
    code = 'import prior; m = prior.Prior(prior.PriorConfig(n_layer=1)); print("ok")'
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': ''})
    assert r.stdout.strip() == 'ok', r.stderr


@pytest.mark.parametrize('turn_context', [None, 1])
def test_story_window_with_a_new_prompt_is_guided_throughout(turn_context):
    import sample
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY)).eval()
    calls = []
    generate = m.generate

    def spy(text, prefix=None, **kw):
        calls.append((0 if prefix is None else prefix.shape[1], kw.get('guide_frames')))
        out = generate(text, prefix=prefix, **kw)
        assert prefix is None or torch.equal(out[:, :prefix.shape[1]], prefix)
        return out
    m.generate = spy
    a, b = batch()[0], batch(seed=1)[0]
    codes = sample.generate_codes(m, [a, a, b, b], n_latent=7, context=2, temperature=0, guide_frames=1,
                                  turn_context=turn_context)
    assert codes.shape == (2, 7, 2, 2)
    # (latent frames kept, guided frames) per window: a (new), a, then b, where the prompt changes: all 3 frames
    # guided, and with turn_context 1 only the last latent frame kept, so b's windows make 2 frames, then 1
    assert calls == ([(0, 1), (2, 1), (2, 3), (2, 1), (2, 1)] if turn_context is None else [(0, 1), (2, 1), (1, 3), (2, 1)])


@pytest.mark.parametrize('mode', ['ar', 'mask'])
def test_compiled_training_step_matches_eager(mode):
    import torch._inductor.config as inductor_config
    torch.manual_seed(0)
    m = Prior(PriorConfig(**TINY, mode=mode))  # training mode: text dropout and, in mask mode, random masks
    text, codes = batch(B=4)
    torch.manual_seed(1)
    _, eager = m(text, codes)
    with inductor_config.patch(fallback_random=True):  # the compiled graph draws the same random numbers as eager
        torch.manual_seed(1)
        _, loss = torch.compile(m)(text, codes)
    assert torch.allclose(loss, eager, rtol=1e-4), (loss, eager)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
