import dataclasses

import pytest
import torch

from tokenizer import FSQ, LFQ, PadPast, Tokenizer, TokenizerConfig

TINY = dict(channels=8, ch_mult=(1, 2, 2), levels=(4, 3, 3))


@pytest.mark.parametrize('layout', [torch.channels_last_3d, torch.contiguous_format])
def test_past_padding_is_f_pad_with_the_gradient_laid_out_like_its_input(layout):
    # F.pad's gradient is a strided slice, on which a channels-last SiLU backward ran 9x slower
    x = torch.randn(2, 4, 5, 6, 6).to(memory_format=layout).requires_grad_()
    y = PadPast.apply(x, 2)
    assert torch.equal(y, torch.nn.functional.pad(x, (0, 0, 0, 0, 2, 0)))
    g = torch.randn(y.shape).to(memory_format=torch.channels_last_3d)
    grad, = torch.autograd.grad(y, x, g)
    assert torch.equal(grad, g[:, :, 2:]) and grad.is_contiguous(memory_format=layout)


def test_fsq_index_code_bijection():
    q = FSQ((8, 5, 5, 5))
    assert q.codebook_size == 1000
    idx = torch.arange(1000)
    codes = q.indices_to_codes(idx)  # (1000, 4)
    assert codes.shape == (1000, 4) and codes.abs().max() <= 1
    z = torch.randn(2, 4, 3, 5, 5) * 3
    c, i, _ = q(z)
    assert torch.equal(q.indices_to_codes(i), c)  # index -> code recovers the quantized code exactly
    assert i.min() >= 0 and i.max() < 1000
    assert len(torch.unique(q(torch.randn(20000, 4, 1) * 2)[1])) > 900  # all codes reachable


def test_fsq_gradient_flows_and_is_fp32_under_autocast():
    q = FSQ((8, 5, 5, 5))
    z = torch.randn(2, 4, 3, 4, 4, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        c, _, _ = q(z.bfloat16())
    assert c.dtype == torch.float32
    c.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_lfq_codes_and_entropy_loss():
    q = LFQ(6, entropy_weight=0.1, commit_weight=0.25)
    z = torch.randn(3, 6, 2, 4, 4, requires_grad=True)
    c, i, loss = q(z)
    assert torch.equal(q.indices_to_codes(i), c.detach().sign())
    assert q.codebook_size == 64 and i.max() < 64
    loss.backward()
    assert z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='16 bits or fewer'):
        LFQ(20, 0.1, 0.25)


@pytest.mark.parametrize('quantizer', ['fsq', 'lfq'])
def test_shapes_and_image_input(quantizer):
    m = Tokenizer(TokenizerConfig(**TINY, quantizer=quantizer, lfq_dim=6)).eval()
    x = torch.rand(2, 3, 17, 32, 32) * 2 - 1
    codes = m.encode(x)
    assert codes.shape == (2, 5, 8, 8) and codes.max() < m.codebook_size
    assert m.decode(codes).shape == (2, 3, 17, 32, 32)
    img = x[:, :, 0]
    img_codes = m.encode(img)  # an image is a one-frame video in the same code space
    assert img_codes.shape == (2, 1, 8, 8) and torch.equal(img_codes[:, 0], codes[:, 0])
    rec, loss = m(img)
    assert rec.shape == img.shape and loss.ndim == 0


def test_causality():
    torch.manual_seed(0)
    m = Tokenizer(TokenizerConfig(**TINY, attn=True, n_head=2)).eval()
    x = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    y = x.clone()
    y[:, :, 9:] = torch.rand_like(y[:, :, 9:])  # change frames 9..16: latent frames 0..2 cover frames 0..8
    za, zb = m.encode_latents(x), m.encode_latents(y)
    assert torch.allclose(za[:, :, :3], zb[:, :, :3], atol=1e-5)
    assert not torch.allclose(za[:, :, 3:], zb[:, :, 3:], atol=1e-3)
    # and the decoder: latent frames 0..2 alone decide output frames 0..8
    da, db = m.decode_latents(za), m.decode_latents(torch.cat([za[:, :, :3], zb[:, :, 3:]], 2))
    assert torch.allclose(da[:, :, :9], db[:, :, :9], atol=1e-5)


def test_overfit_one_batch():
    torch.manual_seed(0)
    m = Tokenizer(TokenizerConfig(**TINY, lr=3e-3))
    x = torch.zeros(2, 3, 5, 16, 16) - 1
    x[:, 0, :, 4:10, 4:10] = 1
    opt, = m.configure_optimizers('cpu')
    first = None
    for _ in range(60):
        _, loss = m(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.3 * first
    m.eval()
    assert torch.equal(m.sample(None, x), m.decode(m.encode(x)))  # what the tokenizer keeps of a clip


def test_adaptive_gan_weight_is_the_ratio_of_gradient_norms():
    torch.manual_seed(0)
    m = Tokenizer(TokenizerConfig(**TINY, gan_weight=0.1, disc_channels=8, disc_start=100, gen_start=0))
    torch.nn.init.normal_(m.decoder.conv_out.conv.weight, std=0.02)  # it starts at zero: no gradient to weigh
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    _, _, (x, rec, rec_loss) = m.reconstruct(x)
    gan = m.gan_losses(x, rec, rec_loss, step=0)  # the generator's term alone: gan_weight * weight * g_adv
    weight = gan / (0.1 * m.last_losses['g_adv'])
    last = m.decoder.conv_out.conv.weight
    g_rec, = torch.autograd.grad(rec_loss, last, retain_graph=True)  # VQGAN's formula, unscaled
    g_gan, = torch.autograd.grad(m.last_losses['g_adv'], last, retain_graph=True)
    assert torch.allclose(weight, g_rec.norm() / (g_gan.norm() + 1e-4), rtol=1e-4)  # the scaling cancels
    assert 0 < weight.item() < 1e4


def test_gan_step_updates_both_networks():
    torch.manual_seed(0)
    m = Tokenizer(TokenizerConfig(**TINY, gan_weight=0.1, disc_channels=8, disc_start=0, gen_start=0, betas=(0.5, 0.9)))
    opt, = m.configure_optimizers('cpu')
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(2):  # the decoder's last layer starts at zero: the encoder moves from the second step on
        opt.zero_grad()
        _, loss = m(x, None, step=0)
        loss.backward()
        assert all(p.grad is not None for p in m.parameters())
        opt.step()
    moved = {n.split('.')[0] for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert {'encoder', 'decoder', 'disc'} <= moved
    assert set(m.last_losses) >= {'rec', 'g_adv', 'd'}
    # before the delayed starts only reconstruction trains, and D still sits in the graph (for DDP)
    m2 = Tokenizer(TokenizerConfig(**TINY, gan_weight=0.1, disc_channels=8, disc_start=5, gen_start=10))
    _, loss = m2(x, None, step=0)
    loss.backward()
    assert set(m2.last_losses) == {'rec'} and all(p.grad.abs().sum() == 0 for p in m2.disc.parameters())


def test_training_crops_a_square_around_the_content_then_whole_frames():
    torch.manual_seed(0)
    m = Tokenizer(TokenizerConfig(**TINY, crop=24, crop_steps=0.5, max_iters=10))
    x = torch.zeros(3, 3, 5, 32, 32) - 1
    x[:, :, :, 2:5, 26:29] = 1  # an object near the top right corner: every crop must hold it
    assert torch.equal(m.crop(x), x[..., :24, 8:])
    x = torch.rand(1, 3, 1, 32, 32).expand(64, -1, -1, -1, -1)  # one clip of content everywhere, 64 times:
    starts = {c[0, 0, 0, 0].item() for c in m.crop(x)}  # its crops spread over the room there is (9 x 9 offsets)
    assert len(starts) > 20
    x = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    assert m(x, None, step=4)[0].shape[-2:] == (24, 24)  # the first half of the steps on crops
    assert m(x, None, step=5)[0].shape[-2:] == (32, 32)  # then whole frames
    assert m(x[..., :16, :16], None, step=0)[0].shape[-2:] == (16, 16)  # frames no larger than crop: whole
    m.eval()
    assert m(x, None, step=0)[0].shape[-2:] == (32, 32)  # evaluation sees whole frames
    old = {k: v for k, v in dataclasses.asdict(m.config).items() if k not in ('crop', 'crop_steps')}
    assert Tokenizer.from_checkpoint({'config': old, 'model': m.state_dict()}).config.crop == 0  # as it trained


def test_bad_config_errors():
    with pytest.raises(ValueError, match='multiple of the spatial factor 4'):
        Tokenizer(TokenizerConfig(crop=10))
    with pytest.raises(ValueError, match='crop_steps 2 is a share'):
        Tokenizer(TokenizerConfig(crop_steps=2))
    with pytest.raises(ValueError, match='down_time'):
        Tokenizer(TokenizerConfig(ch_mult=(1, 2)))
    with pytest.raises(ValueError, match="'fsq' or 'lfq'"):
        Tokenizer(TokenizerConfig(quantizer='vq'))
    with pytest.raises(ValueError, match="trains with optimizer 'adamw'"):
        Tokenizer(TokenizerConfig(optimizer='muon'))
    m = Tokenizer(TokenizerConfig(**TINY))
    with pytest.raises(ValueError, match='1 \\+ 4k'):
        m.encode(torch.zeros(1, 3, 16, 32, 32))
    with pytest.raises(ValueError, match='1 \\+ 4k'):
        m.init_from_data(torch.zeros(1, 3, 16, 32, 32))


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    m = Tokenizer(TokenizerConfig(**TINY))
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    _, eager = m(x)
    rec, loss = torch.compile(m)(x)
    assert loss.requires_grad and torch.allclose(loss, eager, rtol=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.slow
def test_gan_step_under_compile_matches_eager():
    # the R1 penalty takes a double backward, which a compiled graph cannot: gan_losses runs eagerly inside it
    import copy
    torch.manual_seed(0)
    m = Tokenizer(TokenizerConfig(**TINY, gan_weight=0.1, disc_channels=8, disc_start=0, gen_start=0))
    c = copy.deepcopy(m)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    _, eager = m(x, None, step=0)
    eager.backward()
    _, loss = torch.compile(c)(x, None, step=0)
    loss.backward()
    assert torch.allclose(loss, eager, rtol=1e-4)
    for (n, p), q in zip(m.named_parameters(), c.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6), n  # the discriminator's R1 gradient too
