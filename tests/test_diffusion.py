"""diffusion.py: the pseudo-3D UNet, the noise process, the samplers, and its path through the scripts."""
import json
import os

import numpy as np
import pytest
import torch

import eval as eval_script
import prepare_data
import sample
import train
from diffusion import (PIXEL_SHIFT, Diffusion, DiffusionConfig, Downsample, FrameNorm, SpaceTimeAttention,
                       alpha_sigma, attend, logsnr_of, shift_times)

TINY = dict(in_channels=4, grid=(3, 4, 4), text_vocab=20, text_len=4, channels=32, head_dim=16, text_dim=32,
            num_res_blocks=1, attn_res=4)


def model(**kw):
    torch.manual_seed(0)
    return Diffusion(DiffusionConfig(**{**TINY, **kw})).eval()


def randomize_zero_inits(m):  # trained-looking residual branches and head, which start at zero
    for name, p in m.named_parameters():
        if name.endswith(('conv2.space.weight', 'conv_out.weight', 'proj_t.weight')):
            torch.nn.init.normal_(p, std=0.05)


def inputs(m, B=2, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = m.config
    z = torch.randn(B, c.in_channels, T, *c.grid[1:], generator=g)
    text = torch.randint(c.text_vocab, (B, c.text_len), generator=g)
    return z, torch.rand(B, generator=g), m.encode_text(text), torch.zeros_like(z), torch.zeros(B, 1, T, 1, 1)


def test_video_path_is_the_image_path_per_frame_at_init_and_never_mixes_videos():
    m = model()
    z, t, text, known, mask = inputs(m)
    with torch.no_grad():
        assert m.net(z, t, text, known, mask).abs().max() == 0  # the head starts at zero
        randomize_zero_inits(m)  # the spatial path trained; the temporal layers still at their init
        for p in m.modules():  # temporal attention's output starts at zero: give it the rest of its init back
            if hasattr(p, 'proj_t'):
                torch.nn.init.zeros_(p.proj_t.weight)
        video = m.net(z, t, text, known, mask)
        frames = torch.stack([m.net(z[:, :, i:i + 1], t, text, known[:, :, i:i + 1], mask[:, :, i:i + 1])[:, :, 0]
                              for i in range(3)], 2)
        assert video.abs().mean() > 0.01 and torch.allclose(video, frames, atol=1e-5)
        image = m.net(z[:, :, 0:1], t, text, known[:, :, :1], mask[:, :, :1])
        randomize_zero_inits(m)  # now time mixes frames: video != frames, but an image is still the image path
        for p in m.modules():
            if isinstance(p, torch.nn.Conv3d) and p.kernel_size == (3, 1, 1):
                torch.nn.init.normal_(p.weight, std=0.1)
        video = m.net(z, t, text, known, mask)
        assert not torch.allclose(video[:, :, 0:1], m.net(z[:, :, 0:1], t, text, known[:, :, :1], mask[:, :, :1]),
                                  atol=1e-3)
        assert image.shape == (2, 4, 1, 4, 4)
        other = z.clone()
        other[1] = -other[1]  # another second video: the first one's prediction does not change
        assert torch.allclose(m.net(other, t, text, known, mask)[0], video[0], atol=1e-5)


def test_schedule():
    t = torch.linspace(0, 1, 101)
    lam = logsnr_of(t)
    a, s = alpha_sigma(lam)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones(101), atol=1e-6)
    assert abs(lam[0] - 15) < 1e-3 and abs(lam[-1] + 15) < 1e-3 and (lam[1:] < lam[:-1]).all()
    assert abs(lam[50]) < 1e-4  # the cosine schedule: half signal, half noise at t = 0.5
    assert torch.equal(shift_times(t, 0.0), t)
    for shift in (-3.0, 2.0):  # the shifted schedule: log-SNR moved by shift, clipped to the schedule's ends
        u = shift_times(t, shift)
        inside = (lam + shift).abs() < 14.9
        assert torch.allclose(logsnr_of(u)[inside], lam[inside] + shift, atol=1e-3) and (u[1:] >= u[:-1]).all()
        assert (u[-1] == 1 and 0 < u[0] < 0.01) if shift < 0 else (u[0] == 0 and 0.99 < u[-1] < 1)


def test_defaults_by_space_and_given_values_kept():
    latent, pixel = DiffusionConfig(in_channels=4, grid=(5, 8, 8)), DiffusionConfig(space='pixel')
    assert (latent.batch_size, latent.channels, latent.ch_mult, latent.time_down) == (32, 64, (1, 2), 0)
    assert (pixel.batch_size, pixel.channels, pixel.ch_mult, pixel.time_down) == (8, 32, (1, 2, 4, 4), 3)
    given = DiffusionConfig(space='pixel', batch_size=4, channels=16, ch_mult=(1, 2), time_down=0)
    assert (given.batch_size, given.channels, given.ch_mult, given.time_down) == (4, 16, (1, 2), 0)


def test_noise_shift_moves_the_training_times_to_more_noise_and_is_kept_in_checkpoints():
    pixel = model(space='pixel', in_channels=3, grid=(3, 8, 8), ch_mult=(1, 2))
    assert model().config.noise_shift == 0 and pixel.config.noise_shift == PIXEL_SHIFT
    m = model(noise_shift=-3.0).train()
    seen = []
    m.net = lambda z, t, *rest: seen.append(t) or torch.zeros_like(z)
    x, text = torch.rand(64, 4, 3, 4, 4) * 2 - 1, torch.randint(20, (64, 4))
    m(x, text)
    assert abs(logsnr_of(torch.cat(seen)).median() + 3) < 0.3  # half the clips noisier than log-SNR -3, not 0
    seen.clear()
    m(x[:, :, 0], text)  # images keep the cosine schedule
    assert abs(logsnr_of(torch.cat(seen)).median()) < 0.3
    config = {k: v for k, v in pixel.config.__dict__.items() if k != 'noise_shift'}
    assert Diffusion.from_checkpoint({'config': config, 'model': pixel.state_dict()}).config.noise_shift == 0


def oracle(m, x0):
    """A network that predicts the exact v of the clean clip x0 (B, C, T, H, W), in the model's units."""
    def net(z, t, text, known, mask):
        a, s = (u.view(-1, 1, 1, 1, 1) for u in alpha_sigma(logsnr_of(t)))
        n = z.shape[0] // x0.shape[0]
        return (a * z - x0.repeat(n, 1, 1, 1, 1) * m.scale) / s  # v = alpha eps - sigma x0
    return net


def test_v_loss_is_zero_for_the_exact_target_and_its_gradient_flows():
    m = model().train()
    x = torch.rand(2, 4, 3, 4, 4) * 2 - 1
    text = torch.randint(20, (2, 4))
    m.init_from_data(x, text)
    loss = m(x, text)[1]
    loss.backward()
    assert loss > 0.1 and m.conv_out.weight.grad.abs().sum() > 0
    m.net = oracle(m, x)
    assert m(x, text)[1] < 1e-8


@pytest.mark.parametrize('sampler, steps, shift', [('ddim', 1, 0.0), ('ddim', 5, 0.0), ('dpm', 1, 0.0), ('dpm', 6, 0.0),
                                                 ('ddim', 5, -3.0), ('dpm', 6, -3.0)])
def test_samplers_land_on_the_clean_clip_of_an_exact_network(sampler, steps, shift):
    m = model(noise_shift=shift)
    x0 = (torch.rand(2, 4, 3, 4, 4) * 2 - 1) * 0.9
    m.net = oracle(m, x0)
    out = m.sample(torch.zeros(2, 4, dtype=torch.long), generator=torch.Generator().manual_seed(0), sampler=sampler,
                   steps=steps, cfg=1.0)
    assert torch.allclose(out, x0, atol=1e-3)


def test_ddim_is_deterministic_guidance_at_one_is_the_conditional_pass_and_given_frames_are_kept():
    m = model()
    randomize_zero_inits(m)
    text = torch.randint(20, (2, 4))
    run = lambda seed, **kw: m.sample(text, generator=torch.Generator().manual_seed(seed), steps=3, **kw)
    assert torch.equal(run(0, sampler='ddim'), run(0, sampler='ddim')) and not torch.equal(run(0), run(1))
    assert not torch.equal(run(0, sampler='ddim', eta=1.0), run(0, sampler='ddim'))
    # scale 1 runs the conditional pass alone; a scale just above it runs [cond; uncond] batched: the same videos
    assert torch.allclose(run(0, cfg=1.0), run(0, cfg=1.0 + 1e-6), atol=1e-4)
    assert not torch.allclose(run(0, cfg=1.0), run(0, cfg=3.0), atol=1e-3)
    given = torch.rand(2, 4, 1, 4, 4) * 2 - 1
    last = torch.rand(2, 4, 1, 4, 4) * 2 - 1
    out = m.sample(text, x=given, last=last, generator=torch.Generator().manual_seed(0), steps=2)
    assert torch.equal(out[:, :, :1], given) and torch.equal(out[:, :, -1:], last)
    with pytest.raises(ValueError, match='given frames must be'):
        m.sample(text, x=torch.rand(2, 4, 4, 4, 4))


@pytest.mark.parametrize('kw, words', [(dict(sampler='euler'), "sampler must be 'ddim' or 'dpm'"),
                                       (dict(steps=0), 'steps must be at least 1'),
                                       (dict(eta=0.5), 'eta'), (dict(temperature=1.0), 'not a sampling setting')])
def test_bad_settings(kw, words):
    with pytest.raises(ValueError, match=words):
        model().settings(**kw)


def test_bad_configs():
    with pytest.raises(ValueError, match="space must be 'latent' or 'pixel'"):
        Diffusion(DiffusionConfig(**{**TINY, 'space': 'pixels'}))
    with pytest.raises(ValueError, match='must divide by 2'):
        Diffusion(DiffusionConfig(**{**TINY, 'grid': (3, 5, 5)}))
    with pytest.raises(ValueError, match='noise_shift is a log-SNR shift'):
        Diffusion(DiffusionConfig(**{**TINY, 'noise_shift': float('inf')}))


def test_image_pretrain_trains_on_one_frame_of_each_clip():
    m = model(image_pretrain=True).train()
    seen = []
    real = m.net
    m.net = lambda z, t, text, known, mask: seen.append((z.shape, known, mask)) or real(z, t, text, known, mask)
    x = (torch.arange(3).view(1, 1, 3, 1, 1) + torch.tensor([0, 10]).view(2, 1, 1, 1, 1)).expand(2, 4, 3, 4, 4)
    frames = set()
    for _ in range(20):
        m(x.float(), torch.randint(20, (2, 4)))
        shape, known, mask = seen.pop()
        assert shape == (2, 4, 1, 4, 4) and not mask.any()  # 2 clips, one image each, nothing given
        assert torch.all(known == known[:, :, :, :1, :1])  # each image one frame (known is the clean image)
        frame = known[:, 0, 0, 0, 0] - torch.tensor([0, 10])
        assert all(f in (0, 1, 2) for f in frame.tolist())  # from its own clip
        frames.update(frame.tolist())
    assert frames == {0, 1, 2}  # a random frame each time


def test_bfloat16_attention_on_cpu_matches_sdpa():
    # in bfloat16 on CPU attend() is a plain matmul-softmax-matmul (PyTorch's CPU flash backward is 5-10x slower
    # there): the values and gradients of SDPA in float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 16, 64, generator=g, requires_grad=True)
    k, v = (torch.randn(3, 7, 64, generator=g, requires_grad=True) for _ in range(2))
    heads = lambda a: a.view(3, a.shape[1], 4, 16).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    ref = ref.transpose(1, 2).reshape(3, 16, 64)
    assert torch.allclose(attend(q, k, v, 4), ref, atol=1e-5)
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=0.03)
    for a, b in zip(torch.autograd.grad(ref.sum(), (q, k, v)), torch.autograd.grad(out.float().sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=0.05)


@pytest.mark.parametrize('T', [1, 4])
def test_space_time_attention_keeps_channels_last(T):
    # a strided output made the norms, SiLUs and adds after it take slow paths (training 1.1x slower)
    attn = SpaceTimeAttention(32, 2, 16)
    x = torch.randn(2, 32, T, 4, 4).to(memory_format=torch.channels_last_3d)
    assert attn(x, torch.randn(2, 5, 16)).is_contiguous(memory_format=torch.channels_last_3d)


def test_frame_norm_is_group_norm_of_each_frame_in_either_memory_format():
    norm = FrameNorm(64)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 64, 3, 4, 4) * 3 + 1
    ref = torch.nn.GroupNorm(32, 64)
    ref.load_state_dict(norm.state_dict())
    frames = torch.stack([ref(x[:, :, i]) for i in range(3)], 2)  # (B, C, T, H, W): each frame an image
    with torch.no_grad():
        assert torch.allclose(norm(x), frames, atol=1e-5)
        assert torch.allclose(norm(x.to(memory_format=torch.channels_last_3d)), frames, atol=1e-5)
        assert norm(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize('T', [1, 2, 5, 8])
def test_time_down_halves_the_frames_of_the_low_levels_and_gives_every_frame_back(T):
    m = model(time_down=1, grid=(T, 4, 4))
    randomize_zero_inits(m)
    seen = []
    m.mid[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape[2]))
    z, t, text, known, mask = inputs(m, T=T)
    with torch.no_grad():
        v = m.net(z, t, text, known, mask)
        assert v.shape == z.shape and seen == [(T + 1) // 2]  # the 2x2 level sees ceil(T / 2) frames
        down = m.down[1]  # at init: the strided spatial convolution, then every other frame
        assert isinstance(down, Downsample) and torch.allclose(down(z[:, :1].expand(2, 32, T, 4, 4).contiguous()),
                                                                down.space(z[:, :1].expand(2, 32, T, 4, 4))[:, :, ::2])
        other = z.clone()
        other[1] = -other[1]  # another second video: the first one's prediction does not change
        assert torch.allclose(m.net(other, t, text, known, mask)[0], v[0], atol=1e-5)
    assert model(space='pixel', in_channels=3, grid=(T, 16, 16), ch_mult=(1, 2, 2)).config.time_down == 2
    assert model().config.time_down == 0  # latents: every level sees all 5 frames
    for bad in (2, -2):
        with pytest.raises(ValueError, match=r'time_down counts downsamplings.*or -1 \(by space\)'):
            model(time_down=bad)


def test_checkpoints_before_time_down_load_without_it():
    m = model(space='pixel', in_channels=3, grid=(3, 8, 8), ch_mult=(1, 2), time_down=0)
    config = {k: v for k, v in m.config.__dict__.items() if k != 'time_down'}
    old = Diffusion.from_checkpoint({'config': config, 'model': m.state_dict()})
    assert old.config.time_down == 0 and not any(isinstance(l, Downsample) for l in old.down)


# ---------------------------------------------------------------------------------------------------------------
# the scripts, on a tiny run in each space

NET = ['--channels', '32', '--ch_mult', '1,2', '--head_dim', '16', '--text_dim', '32', '--batch_size', '2',
       '--eval_iters', '1', '--dtype', 'float32', '--max_iters', '2', '--eval_interval', '100']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('diffusion')
    data = str(d / 'shapes')
    prepare_data.prepare(prepare_data.get_args(['--out', data, '--n_train', '16', '--n_val', '4', '--size', '32',
                                                '--frames', '9']))
    assert train.main(['--model=tokenizer', '--data', data, '--out_dir', str(d / 'tok'), '--max_iters', '1',
                       '--channels', '8', '--batch_size', '2', '--eval_iters', '1', '--eval_interval', '100']) == 0
    assert train.main(['--model=diffusion', '--data', data, '--tokenizer', str(d / 'tok' / 'ckpt.pt'),
                       '--out_dir', str(d / 'latent'), *NET]) == 0
    assert train.main(['--model=diffusion', '--space=pixel', '--data', data, '--resolution', '16',
                       '--out_dir', str(d / 'pixel'), *NET]) == 0
    return d


def test_checkpoints(runs):
    lat = torch.load(runs / 'latent' / 'ckpt.pt', weights_only=True)
    assert lat['config']['grid'] == (3, 8, 8) and lat['config']['in_channels'] == 4  # the tokenizer's latents
    assert lat['tokenizer'] is not None and lat['model']['scale'] != 1  # latents scaled to unit variance
    pix = torch.load(runs / 'pixel' / 'ckpt.pt', weights_only=True)
    assert pix['config']['grid'] == (9, 16, 16) and pix['config']['in_channels'] == 3 and pix['tokenizer'] is None
    assert pix['model']['scale'] == 1 and os.path.exists(runs / 'pixel' / 'sample_000002.png')


@pytest.mark.parametrize('space, frames', [('latent', 9), ('pixel', 9)])
def test_sample_and_eval_cli(runs, space, frames, tmp_path, run):
    ckpt = str(runs / space / 'ckpt.pt')
    code, log = run(sample, '--ckpt', ckpt, '--prompt', 'a big red circle moving left', '--num_samples', '2',
                    '--steps', '2', '--out', str(tmp_path), '--no_mp4')
    assert code == 0, log
    size = 32 if space == 'latent' else 16
    assert np.load(tmp_path / 'a_big_red_circle_moving_left_0.npy').shape == (frames, size, size, 3)
    # a story through the sliding window, and image to video
    iio_img = np.load(tmp_path / 'a_big_red_circle_moving_left_0.npy')[0]
    import imageio.v3 as iio
    iio.imwrite(tmp_path / 'first.png', iio_img)
    code, log = run(sample, '--ckpt', ckpt, '--story', 'a red ball moving left|a red ball moving up', '--frames', '17',
                    '--num_samples', '1', '--steps', '2', '--sampler', 'ddim', '--out', str(tmp_path), '--no_mp4')
    assert code == 0, log
    assert np.load(tmp_path / 'a_red_ball_moving_left_a_red_ball_moving_up_0.npy').shape[0] == 17
    code, log = run(sample, '--ckpt', ckpt, '--prompt', 'a blue box', '--image', str(tmp_path / 'first.png'),
                    '--num_samples', '1', '--steps', '2', '--out', str(tmp_path), '--no_mp4')
    assert code == 0, log
    made = np.load(tmp_path / 'a_blue_box_0.npy')
    if space == 'pixel':  # the given frame comes back as it was
        assert np.abs(made[0].astype(int) - iio_img.astype(int)).max() <= 1
    code, log = run(eval_script, '--ckpt', ckpt, '--n_prompts', '3', '--samples_per_prompt', '1', '--steps', '2',
                    '--json', str(tmp_path / 'acc.json'))
    assert code == 0, log
    acc = json.load(open(tmp_path / 'acc.json'))
    assert acc['all_prompts']['n'] == 3 and acc['settings']['sampler'] == 'dpm'
    code, log = run(eval_script, '--ckpt', ckpt, '--given', 'ends', '--n', '3', '--steps', '2', '--json',
                    str(tmp_path / 'ends.json'))
    assert code == 0, log
    ends = json.load(open(tmp_path / 'ends.json'))
    assert ends['clips'] == 3 and ends['captions']['n'] == 3 and ends['between_psnr'] > 0 and ends['crossfade_psnr'] > 0
    assert ends['given_frames_psnr'] > 40  # the given frames come back as they were given
    if space == 'pixel':  # which a model of pixels does in its own space too
        assert ends['decoded_first_frame_psnr'] > 40
    else:  # where a (tiny) tokenizer's decoder alone does not
        assert ends['decoded_first_frame_psnr'] < 30


def test_eval_given_first_on_a_prior_and_ends_refused(runs, run, tmp_path):
    data = str(runs / 'shapes')
    assert train.main(['--model=prior', '--data', data, '--tokenizer', str(runs / 'tok' / 'ckpt.pt'), '--out_dir',
                       str(tmp_path / 'ar'), '--max_iters', '1', '--n_layer', '1', '--n_embd', '32', '--n_head', '2',
                       '--batch_size', '2', '--eval_iters', '1', '--dtype', 'float32']) == 0
    code, log = run(eval_script, '--ckpt', str(tmp_path / 'ar' / 'ckpt.pt'), '--given', 'first', '--n', '2')
    assert code == 0 and 'given_frames_psnr' in log, log
    code, log = run(eval_script, '--ckpt', str(tmp_path / 'ar' / 'ckpt.pt'), '--given', 'ends', '--n', '2')
    assert code == 2 and 'interpolation) needs a diffusion model' in log and 'Traceback' not in log


@pytest.mark.parametrize('argv, words', [
    (['--model=diffusion', '--tokenizer', 'nowhere.pt'], 'no checkpoint at nowhere.pt'),
    (['--model=diffusion', '--space', 'voxel'], "space must be 'latent' or 'pixel'"),
    (['--model=diffusion', '--space=pixel', '--resolution', '16', '--init_from', 'TOK'], 'is a tokenizer checkpoint'),
    (['--model=diffusion', '--space=pixel', '--resolution', '16', '--init_from', 'LATENT'], 'has other sizes'),
])
def test_train_errors(runs, argv, words, run, tmp_path):
    paths = {'TOK': str(runs / 'tok' / 'ckpt.pt'), 'LATENT': str(runs / 'latent' / 'ckpt.pt')}
    argv = [paths.get(a, a) for a in argv]
    code, log = run(train, *argv, '--data', str(runs / 'shapes'), '--out_dir', str(tmp_path), *NET)
    assert code == 2 and words in log and 'Traceback' not in log, log


def test_sample_errors(runs, run, tmp_path):
    code, log = run(sample, '--ckpt', str(runs / 'latent' / 'ckpt.pt'), '--prompt', 'a red ball', '--frames', '10',
                    '--out', str(tmp_path))
    assert code == 2 and '--frames must be 1 + 4k' in log
    code, log = run(sample, '--ckpt', str(runs / 'latent' / 'ckpt.pt'), '--prompt', 'a red ball', '--temperature', '1',
                    '--out', str(tmp_path))
    assert code == 2 and 'temperature is not a sampling setting of a diffusion model' in log


@pytest.mark.slow
def test_init_from_an_image_pretrained_run(runs, run, tmp_path):
    data = str(runs / 'shapes')
    code, log = run(train, '--model=diffusion', '--space=pixel', '--resolution', '16', '--image_pretrain', '--data', data,
                    '--out_dir', str(tmp_path / 'img'), *NET)
    assert code == 0, log
    code, log = run(train, '--model=diffusion', '--space=pixel', '--resolution', '16', '--data', data,
                    '--init_from', str(tmp_path / 'img' / 'ckpt.pt'), '--out_dir', str(tmp_path / 'vid'), *NET)
    assert code == 0, log
    img = torch.load(tmp_path / 'img' / 'ckpt.pt', weights_only=True)
    vid = torch.load(tmp_path / 'vid' / 'ckpt.pt', weights_only=True)
    assert img['config']['image_pretrain'] and not vid['config']['image_pretrain'] and vid['iter_num'] == 2


def test_pixel_diffusion_on_moving_mnist(tmp_path, run):
    from test_prepare_data import write_idx
    src = tmp_path / 'mnist'
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (('train', 20), ('t10k', 10)):
        write_idx(str(src / f'{prefix}-images-idx3-ubyte'), rng.integers(0, 256, (n, 28, 28)))
        write_idx(str(src / f'{prefix}-labels-idx1-ubyte'), np.arange(n) % 10)
    data = str(tmp_path / 'mm')
    prepare_data.prepare(prepare_data.get_args(['--dataset', 'mnist', '--src', str(src), '--out', data, '--n_train', '8',
                                                '--n_val', '2', '--size', '32', '--frames', '5']))
    code, log = run(train, '--model=diffusion', '--space=pixel', '--data', data, '--resolution', '16',
                    '--out_dir', str(tmp_path / 'm'), *NET)
    assert code == 0, log
    code, log = run(sample, '--ckpt', str(tmp_path / 'm' / 'ckpt.pt'), '--prompt', '2 and four', '--num_samples', '1',
                    '--steps', '2', '--out', str(tmp_path / 's'), '--no_mp4')
    assert code == 0, log
    assert np.load(tmp_path / 's' / '2_and_four_0.npy').shape == (5, 16, 16, 3)
    code, log = run(eval_script, '--ckpt', str(tmp_path / 'm' / 'ckpt.pt'))
    assert code == 2 and 'caption accuracy needs a model trained on shapes data' in log


@pytest.mark.slow
def test_pipeline_script_diffusion(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, DATA=str(tmp_path / 'data'), TOK_DATA=str(tmp_path / 'tok_data'), OUT=str(tmp_path / 'out'),
               DATA_FLAGS='--n_train 16 --n_val 4 --size 32 --text_len 48',  # held-out phrasings fit a tiny BPE
               TOK_FLAGS='--max_iters 1 --channels 8 --batch_size 2 --eval_iters 1 --dtype float32',
               SR_FLAGS='--max_iters 1 --channels 8 --n_blocks 1 --batch_size 2 --eval_iters 1 --dtype float32',
               PRIOR_FLAGS=' '.join(NET), SAMPLE_FLAGS='--num_samples 1 --steps 2', EVAL_FLAGS='--n_prompts 3 --steps 2')
    r = subprocess.run(['bash', os.path.join(ROOT, 'pipeline.sh'), 'diffusion'], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / 'out' / 'pipeline_diffusion'
    assert json.load(open(out / 'accuracy.json'))['all_prompts']['n'] == 3
    assert np.load(out / 'samples' / 'a_big_red_circle_moving_left_0.npy').shape == (17, 64, 64, 3)
    assert torch.load(out / 'ckpt.pt', weights_only=True)['model_type'] == 'diffusion'
