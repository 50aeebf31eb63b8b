import dataclasses
import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
import prepare_data
import sample
import train
from superres import SuperRes, SuperResConfig

TINY = dict(channels=8, n_blocks=2)


def clips(B=2, T=5, S=16, seed=0):
    return torch.rand(B, 3, T, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def bicubic(v, s):
    B, C, T, h, w = v.shape
    up = F.interpolate(v.transpose(1, 2).reshape(B * T, C, h, w), scale_factor=s, mode='bicubic', align_corners=False)
    return up.view(B, T, C, h * s, w * s).transpose(1, 2)


def randomize_output(m):  # trained-looking residual branches and head, which start at zero
    for conv in [m.conv_out] + [b.space2 for b in m.blocks]:
        torch.nn.init.normal_(conv.weight, std=0.05)


@pytest.mark.parametrize('scale, scale_t', [(2, 1), (4, 1), (1, 2), (2, 2)])
def test_shapes_of_videos_and_images(scale, scale_t):
    m = SuperRes(SuperResConfig(**TINY, scale=scale, scale_t=scale_t)).eval()
    lo = clips(T=5, S=8)
    assert m.sample(None, lo).shape == (2, 3, 1 + (5 - 1) * scale_t, 8 * scale, 8 * scale)
    if scale_t == 1:  # an image is a one-frame video
        assert m.sample(None, lo[:, :, 0]).shape == (2, 3, 8 * scale, 8 * scale)
    else:
        with pytest.raises(ValueError, match='at least 2 frames'):
            m.sample(None, lo[:, :, 0])


def test_starts_as_the_fixed_upsample_and_keeps_given_frames():
    lo = clips(T=5, S=8)
    m = SuperRes(SuperResConfig(**TINY, scale=2)).eval()
    assert torch.allclose(m.sample(None, lo), bicubic(lo, 2).clamp(-1, 1), atol=1e-6)
    t = SuperRes(SuperResConfig(**TINY, scale=1, scale_t=2)).eval()
    out = t.sample(None, lo)
    assert torch.allclose(out[:, :, 1::2], (lo[:, :, 1:] + lo[:, :, :-1]) / 2, atol=1e-6)  # a cross-fade at first
    randomize_output(t)
    out = t.sample(None, lo, noise=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, ::2], lo) and not torch.allclose(out[:, :, 1::2], (lo[:, :, 1:] + lo[:, :, :-1]) / 2)


def test_video_path_is_the_image_path_per_frame_at_init_and_never_mixes_videos():
    torch.manual_seed(0)
    m = SuperRes(SuperResConfig(**TINY)).eval()
    randomize_output(m)
    lo = clips(T=4, S=8)
    video = m.sample(None, lo)
    frames = torch.stack([m.sample(None, lo[:, :, t]) for t in range(4)], 2)
    assert torch.allclose(video, frames, atol=1e-5)  # the time convolutions start as the identity
    for p in m.modules():  # now let time mix frames
        if isinstance(p, torch.nn.Conv3d) and p.kernel_size == (3, 1, 1):
            torch.nn.init.normal_(p.weight, std=0.1)
    video = m.sample(None, lo)
    assert not torch.allclose(video, frames, atol=1e-3)
    other = lo.clone()
    other[1] = -other[1]  # another second video: the first one's upsampling does not change
    assert torch.equal(m.sample(None, other)[0], video[0])


def test_overfits_and_beats_bicubic():
    torch.manual_seed(0)
    x = torch.full((2, 3, 3, 16, 16), -1.0)
    x[:, 0, :, 4:11, 5:9] = 1  # a sharp red bar: bicubic blurs its edges
    m = SuperRes(SuperResConfig(channels=16, n_blocks=2, blur=0.0, noise=0.0, lr=3e-3))
    opt, = m.configure_optimizers('cpu')
    for _ in range(150):
        _, loss = m(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lo = F.avg_pool3d(x, (1, 2, 2))
    err = lambda v: (v - x).pow(2).mean().item()  # noqa: E731
    assert err(m.eval().sample(None, lo)) < 0.5 * err(bicubic(lo, 2).clamp(-1, 1))


def test_every_layer_learns_from_the_second_step():
    # only the output convolution starts at zero: were the blocks' second convolutions zero too, their first
    # ones would get no gradient until both had grown, the plateau that cost runs 5 dB (RESULTS.md)
    torch.manual_seed(0)
    m = SuperRes(SuperResConfig(**TINY))
    opt, = m.configure_optimizers('cpu')
    x = clips(B=2, T=3, S=16)
    for step in range(2):
        opt.zero_grad()
        m(x)[1].backward()
        if step == 0:
            opt.step()
    stuck = [n for n, p in m.blocks.named_parameters() if n.endswith('weight') and p.grad.abs().max() == 0]
    assert not stuck, stuck


def test_augment_trains_on_flips_transposes_and_reversals_of_each_clip():
    x = clips(B=8, T=3, S=8, seed=1)
    variants = [v for t in (x, x.flip(2)) for s in (t, t.transpose(-1, -2)) for h in (s, s.flip(-1))
                for v in (h, h.flip(-2))]  # the 16 symmetries of a square clip
    m = SuperRes(SuperResConfig(**TINY, blur=0.0, noise=0.0, augment=True))  # at init: bicubic of its input
    torch.manual_seed(0)
    out, _ = m(x)
    seen = set()
    for b in range(8):
        made = [bicubic(F.avg_pool3d(v[b:b + 1], (1, 2, 2)), 2)[0] for v in variants]
        matches = [k for k, v in enumerate(made) if torch.allclose(out[b], v, atol=1e-5)]
        assert matches, f'clip {b} came out as none of its symmetries'
        seen.add(matches[0])
    assert len(seen) > 2  # each clip draws its own
    plain, _ = SuperRes(SuperResConfig(**TINY, blur=0.0, noise=0.0))(x)
    assert torch.allclose(plain, bicubic(F.avg_pool3d(x, (1, 2, 2)), 2), atol=1e-5)


def test_crops_train_on_a_square_of_each_clip_and_evaluation_on_whole_frames():
    x = clips(B=6, T=3, S=16, seed=2)
    m = SuperRes(SuperResConfig(**TINY, blur=0.0, noise=0.0, crop=8))  # at init: the bicubic of its input
    torch.manual_seed(0)
    out, loss = m(x)
    assert out.shape == (6, 3, 3, 8, 8)
    seen = set()
    for b in range(6):
        at = [(i, j) for i in range(9) for j in range(9) if torch.allclose(
            out[b], bicubic(F.avg_pool3d(x[b:b + 1, :, :, i:i + 8, j:j + 8], (1, 2, 2)), 2)[0], atol=1e-5)]
        assert at, f'clip {b} came out as none of its 8x8 squares'
        seen.add(at[0])
    assert len(seen) > 2  # each clip draws its own square
    assert m.eval()(x)[0].shape == x.shape  # validation and previews: whole frames
    assert m.train()(clips(B=2, T=3, S=8))[0].shape == (2, 3, 3, 8, 8)  # frames no larger than the crop: whole
    assert SuperRes(SuperResConfig(**TINY, crop=0))(x)[0].shape == x.shape
    old = SuperRes(SuperResConfig(**TINY))
    ckpt = dict(config={k: v for k, v in dataclasses.asdict(old.config).items() if k != 'crop'}, model=old.state_dict())
    assert SuperRes.from_checkpoint(ckpt).config.crop == 0  # a checkpoint from before crops trained on whole frames


def test_bad_config_and_input():
    for crop in (4, 9):
        with pytest.raises(ValueError, match=f'crop {crop} must be 0'):
            SuperRes(SuperResConfig(crop=crop))
    with pytest.raises(ValueError, match='not both 1'):
        SuperRes(SuperResConfig(scale=1, scale_t=1))
    with pytest.raises(ValueError, match='scale must be 1, 2 or 4'):
        SuperRes(SuperResConfig(scale=3))
    m = SuperRes(SuperResConfig(**TINY, scale_t=2))
    with pytest.raises(ValueError, match='2k \\+ 1 frames'):
        m(clips(T=4))
    with pytest.raises(ValueError, match='divides by --scale 2'):
        m(clips(S=15))
    with pytest.raises(ValueError, match='at least 4x4'):
        m.sample(None, clips(S=2))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('sr')
    data = str(d / 'shapes')
    prepare_data.prepare(prepare_data.get_args(['--out', data, '--n_train', '24', '--n_val', '6', '--size', '32']))
    common = ['--data', data, '--max_iters', '2', '--batch_size', '2', '--eval_iters', '1', '--eval_interval', '100',
              '--dtype', 'float32']
    assert train.main(['--model=superres', *common, '--out_dir', str(d / 'space'), '--crop', '16', *sum(
        ([f'--{k}', str(v)] for k, v in TINY.items()), [])]) == 0  # trains on crops, previews whole clips
    assert train.main(['--model=superres', *common, '--out_dir', str(d / 'time'), '--scale', '1', '--scale_t', '2',
                       '--channels', '8', '--n_blocks', '1']) == 0
    assert train.main(['--model=tokenizer', *common, '--out_dir', str(d / 'tok'), '--channels', '8', '--resolution',
                       '16']) == 0
    assert train.main(['--model=prior', *common, '--out_dir', str(d / 'ar'), '--tokenizer', str(d / 'tok' / 'ckpt.pt'),
                       '--resolution', '16', '--n_layer', '1', '--n_embd', '32', '--n_head', '2']) == 0
    return d


def test_train_sample_eval(runs, tmp_path, run):
    ckpt = torch.load(runs / 'space' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_type'] == 'superres' and ckpt['data_key']['resolution'] == 32  # the data's size: 0
    assert os.path.exists(runs / 'space' / 'sample_000002.png')
    # a prior's 16x16 videos through space x2 and time x2: 32x32, 9 -> 17 frames, and the GIF at twice the fps
    code, log = run(sample, '--ckpt', str(runs / 'ar' / 'ckpt.pt'), '--prompt', 'a red ball moving up',
                    '--num_samples', '1', '--out', str(tmp_path / 's'), '--superres', str(runs / 'space' / 'ckpt.pt'),
                    '--superres', str(runs / 'time' / 'ckpt.pt'), '--sr_noise', '0.05', '--no_mp4')
    assert code == 0, log
    assert np.load(tmp_path / 's' / 'a_red_ball_moving_up_0.npy').shape == (33, 32, 32, 3)
    rec = json.loads(open(tmp_path / 's' / 'samples.jsonl').readline())
    assert rec['superres'] == [str(runs / 'space' / 'ckpt.pt'), str(runs / 'time' / 'ckpt.pt')] and rec['sr_noise'] == 0.05
    assert iio.immeta(tmp_path / 's' / 'a_red_ball_moving_up_0.gif')['duration'] == pytest.approx(1000 / 16, abs=5)  # GIF: 10 ms
    for name, baseline in (('space', 'bicubic'), ('time', 'crossfade')):
        code, log = run(eval_script, '--ckpt', str(runs / name / 'ckpt.pt'), '--n', '4', '--json',
                        str(tmp_path / 'm.json'))
        assert code == 0, log
        m = json.load(open(tmp_path / 'm.json'))
        assert m['clips'] == 4 and 0 <= m['reader_accuracy'] <= 1 and 0 < m['model']['ssim'] <= 1
        assert m['model']['psnr'] > 10 and baseline in m and 'psnr' in m[baseline]
    code, log = run(eval_script, '--ckpt', str(runs / 'ar' / 'ckpt.pt'), '--n_prompts', '2', '--samples_per_prompt',
                    '1', '--superres', str(runs / 'space' / 'ckpt.pt'), '--json', str(tmp_path / 'a.json'))
    assert code == 0, log
    acc = json.load(open(tmp_path / 'a.json'))
    assert acc['all_prompts']['n'] == acc['superres']['n'] == 2  # the same videos, before and after


def test_sr_noise_leaves_the_generated_videos_as_they_were(runs, run, monkeypatch):
    seen = []
    real = prepare_data.caption_accuracy
    monkeypatch.setattr(prepare_data, 'caption_accuracy', lambda v, p, *rest: seen.append(v.copy()) or real(v, p, *rest))
    for noise in ('0', '0.5'):  # batches of one: the second video comes after the first one's upsampling noise
        code, log = run(eval_script, '--ckpt', str(runs / 'ar' / 'ckpt.pt'), '--n_prompts', '2', '--samples_per_prompt',
                        '1', '--batch_size', '1', '--superres', str(runs / 'space' / 'ckpt.pt'), '--sr_noise', noise)
        assert code == 0, log
    assert len(seen) == 4 and np.array_equal(seen[0], seen[2]) and not np.array_equal(seen[1], seen[3])  # 32x32 alike


@pytest.mark.parametrize('argv, words', [
    (['--ckpt', 'SPACE', '--prompt', 'x'], 'is a superres checkpoint; sampling needs a generator'),
    (['--ckpt', 'AR', '--prompt', 'x', '--superres', 'AR'], 'is a prior checkpoint, not an upsampler'),
    (['--ckpt', 'AR', '--prompt', 'x', '--superres', 'nowhere.pt'], 'train one with python train.py --model=superres'),
    (['--ckpt', 'AR', '--prompt', 'a red ball', '--superres', 'SPACE', '--sr_noise', '-1'], 'noise must be >= 0'),
])
def test_sample_errors(runs, tmp_path, run, argv, words):
    paths = {'SPACE': str(runs / 'space' / 'ckpt.pt'), 'AR': str(runs / 'ar' / 'ckpt.pt')}
    code, log = run(sample, *[paths.get(a, a) for a in argv], '--out', str(tmp_path))
    assert code == 2 and words in log and 'Traceback' not in log, log


def test_your_own_video(runs, tmp_path, run):
    # a few frames of textured real-looking footage written here: a smooth random texture panning across the view
    g = np.random.default_rng(0)
    texture = F.interpolate(torch.tensor(g.random((1, 3, 12, 12)), dtype=torch.float32), size=96, mode='bicubic')
    frames = [(texture[0, :, 10:74, k:k + 64].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy() for k in range(24)]
    os.makedirs(tmp_path / 'mine')
    iio.imwrite(tmp_path / 'mine' / 'pan.mp4', np.stack(frames), fps=8, macro_block_size=1)
    data = str(tmp_path / 'data')
    assert prepare_data.main(['--dataset', 'folder', '--src', str(tmp_path / 'mine'), '--out', data, '--size', '32',
                              '--frames', '9', '--stride', '2']) == 0
    assert train.main(['--model=superres', '--data', data, '--out_dir', str(tmp_path / 'sr'), '--max_iters', '2',
                       '--batch_size', '2', '--eval_iters', '1', '--channels', '8', '--n_blocks', '1']) == 0
    code, log = run(eval_script, '--ckpt', str(tmp_path / 'sr' / 'ckpt.pt'), '--json', str(tmp_path / 'm.json'))
    assert code == 0, log
    m = json.load(open(tmp_path / 'm.json'))
    assert 'reader_accuracy' not in m and m['bicubic']['psnr'] > 15  # no shapes reader for real footage
