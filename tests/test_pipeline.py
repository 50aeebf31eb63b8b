"""The prior's path end to end on a tiny run: train.py --model=prior, sample.py, eval.py, pipeline.sh."""
import json
import os
import re
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import eval as eval_script
import prepare_data
import sample
import tokenizer
import train
from conftest import ROOT

PRIOR = ['--n_layer', '1', '--n_embd', '32', '--n_head', '2', '--batch_size', '4', '--eval_iters', '1', '--dtype', 'float32']


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('pipe')
    data = str(d / 'shapes')
    prepare_data.prepare(prepare_data.get_args(['--out', data, '--n_train', '24', '--n_val', '8', '--size', '32',
                                                '--holdout', 'green triangle']))
    assert train.main(['--model=tokenizer', '--data', data, '--out_dir', str(d / 'tok'), '--max_iters', '2',
                       '--channels', '8', '--batch_size', '2', '--eval_iters', '1', '--eval_interval', '100']) == 0
    for mode in ('ar', 'mask'):
        assert train.main(['--model=prior', f'--mode={mode}', '--data', data, '--tokenizer', str(d / 'tok' / 'ckpt.pt'),
                           '--out_dir', str(d / mode), '--max_iters', '2', '--eval_interval', '100', *PRIOR]) == 0
    return d


def test_prior_checkpoint_carries_tokenizer_and_codes_are_cached(run_dir):
    ckpt = torch.load(run_dir / 'ar' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_type'] == 'prior' and ckpt['config']['grid'] == (5, 8, 8)
    assert ckpt['config']['optimizer'] == 'muon' and len(ckpt['optimizer']) == 2  # the prior's recipe: Muon + AdamW
    assert ckpt['config']['text_layers'] == 2 and ckpt['config']['lr'] == 6e-3  # the default and the mode's lr
    assert torch.load(run_dir / 'mask' / 'ckpt.pt', weights_only=True)['config']['lr'] == 3e-3  # the mode's lr
    assert ckpt['tokenizer']['config']['channels'] == 8 and 'vocab_size' in ckpt['data_meta']['text']
    caches = [f for f in os.listdir(run_dir / 'shapes') if '_codes_' in f]
    assert len(caches) == 2  # train and val, encoded once for both modes
    assert os.path.exists(run_dir / 'ar' / 'sample_000002.png')


def old_format(ckpt: dict) -> dict:
    """A checkpoint as train.py wrote it before the training recipe moved into the config (and before rotary
    positions, for a prior): the recipe in args, the optimizer state a dict, the config with first_prob."""
    old = dict(ckpt, config=dict(ckpt['config']), args=dict(ckpt['args']))
    for k in ('optimizer', 'lr', 'weight_decay', 'batch_size', 'max_iters', 'ema'):
        old['args'][k] = old['config'].pop(k)
    old['args']['beta1'], old['args']['beta2'] = old['config'].pop('betas')
    states = ckpt['optimizer']
    old['optimizer'] = states[0] if len(states) == 1 else {'optimizers': states}
    if old['model_type'] == 'prior':
        old['config']['first_prob'] = 0.0
        del old['config']['rope']
    return old


def test_checkpoints_from_before_load_sample_and_resume(run_dir, tmp_path, run):
    for name in ('tok', 'ar', 'mask'):
        torch.save(old_format(torch.load(run_dir / name / 'ckpt.pt', weights_only=True)), tmp_path / f'{name}.pt')
    old = train.load_model(train.read_checkpoint(str(tmp_path / 'ar.pt')), 'cpu')
    new = train.load_model(train.read_checkpoint(str(run_dir / 'ar' / 'ckpt.pt')), 'cpu')
    assert old.config.rope is False and old.rope is None  # trained before rotary positions: none
    text, codes = torch.ones(1, old.config.text_len, dtype=torch.long), torch.zeros(1, *old.config.grid, dtype=torch.long)
    assert not torch.allclose(old(codes, text)[0], new(codes, text)[0])
    code, log = run(sample, '--ckpt', str(tmp_path / 'mask.pt'), '--prompt', 'a red ball moving up',
                    '--num_samples', '1', '--out', str(tmp_path / 's'), '--no_mp4')
    assert code == 0, log
    os.makedirs(tmp_path / 'resume')
    os.replace(tmp_path / 'mask.pt', tmp_path / 'resume' / 'ckpt.pt')
    assert train.main(['--model=prior', '--mode=mask', '--data', str(run_dir / 'shapes'), '--tokenizer',
                       str(run_dir / 'tok' / 'ckpt.pt'), '--out_dir', str(tmp_path / 'resume'), '--max_iters', '3',
                       '--resume', *PRIOR]) == 0
    assert torch.load(tmp_path / 'resume' / 'ckpt.pt', weights_only=True)['iter_num'] == 3


def test_muon_resume_is_exact_and_keeps_its_optimizer(run_dir, tmp_path, run):
    common = ['--model=prior', '--mode=mask', '--data', str(run_dir / 'shapes'), '--tokenizer', str(run_dir / 'tok' / 'ckpt.pt'),
              '--lr_decay_iters', '4', '--warmup_iters', '1', '--eval_interval', '100', *PRIOR]
    assert train.main([*common, '--out_dir', str(tmp_path / 'a'), '--max_iters', '4']) == 0
    assert train.main([*common, '--out_dir', str(tmp_path / 'b'), '--max_iters', '2']) == 0
    assert train.main([*common, '--out_dir', str(tmp_path / 'b'), '--max_iters', '4', '--resume']) == 0
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in 'ab')
    assert b['iter_num'] == 4
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    code, log = run(train, *common, '--optimizer', 'adamw', '--out_dir', str(tmp_path / 'b'), '--max_iters', '6',
                    '--resume')
    assert code == 2 and 'trained with --optimizer muon; drop --optimizer' in log and 'Traceback' not in log


@pytest.mark.parametrize('mode', ['ar', 'mask'])
def test_sample_cli(run_dir, mode, tmp_path, run):
    out = tmp_path / 's'
    argv = ['--ckpt', str(run_dir / mode / 'ckpt.pt'), '--prompt', 'a big red circle moving left', '--num_samples', '2',
            '--seed', '1']
    code, log = run(sample, *argv, '--out', str(out), *(['--steps', '4'] if mode == 'mask' else []))
    assert code == 0, log
    assert 's per video' in log
    for f in ('a_big_red_circle_moving_left_0.gif', 'a_big_red_circle_moving_left_1.mp4',
              'a_big_red_circle_moving_left.png', 'samples.jsonl'):
        assert os.path.exists(out / f), f
    v = np.load(out / 'a_big_red_circle_moving_left_0.npy')
    assert v.shape == (17, 32, 32, 3) and v.dtype == np.uint8
    rec = [json.loads(ln) for ln in open(out / 'samples.jsonl')]
    assert len(rec) == 2 and rec[0]['prompt'] == 'a big red circle moving left' and rec[0]['seed'] == 1
    assert rec[0]['cfg'] == 2.0 and rec[0]['dtype'] in ('float32', 'bfloat16')  # the values used, not None
    if mode == 'ar':
        assert rec[0]['guide_frames'] == 1 and 'steps' not in rec[0]
    else:
        assert (rec[0]['first_steps'], rec[0]['refine_steps'], rec[0]['refine_cfg']) == (1, 2, 1.0)  # a third of 4
    # the same seed reproduces the same video
    code, _ = run(sample, *argv, '--out', str(tmp_path / 's2'), '--no_mp4', *(['--steps', '4'] if mode == 'mask'
                                                                                   else []))
    assert code == 0 and np.array_equal(v, np.load(tmp_path / 's2' / 'a_big_red_circle_moving_left_0.npy'))


def test_long_story_and_image(run_dir, tmp_path, run):
    img = tmp_path / 'first.png'
    first = prepare_data.render_shapes(prepare_data.sample_shapes(1, 64, 2, np.random.default_rng(0)), 64)[0, 0]
    iio.imwrite(img, first)
    code, log = run(sample, '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--story',
                    'a red circle moving left|a red circle moving up', '--frames', '33', '--num_samples', '1',
                    '--out', str(tmp_path / 'o'), '--no_mp4', '--image', str(img))
    assert code == 0, log
    npys = [f for f in os.listdir(tmp_path / 'o') if f.endswith('.npy')]
    assert len(npys) == 1 and np.load(tmp_path / 'o' / npys[0]).shape == (33, 32, 32, 3)
    rec = json.loads(open(tmp_path / 'o' / 'samples.jsonl').readline())
    assert rec['parts'] == ['a red circle moving left', 'a red circle moving up']
    assert rec['part_frames'] == [[0, 17], [17, 33]]  # the frames shared out in proportion
    assert rec['centre'] is False  # its data does not wrap round the canvas
    code, log = run(sample, '--ckpt', str(run_dir / 'mask' / 'ckpt.pt'), '--prompt', 'a red circle moving left',
                    '--num_samples', '1', '--steps', '3', '--out', str(tmp_path / 'm'), '--no_mp4', '--image', str(img))
    assert code == 0, log


class WindowRecorder:
    """A stand-in generator of pixels (B, 1, t, 1, 1) that records the windows sample_long asks for: (frames
    given, new prompt); window k's new frames hold k."""
    config = type('Config', (), {'grid': (3, 1, 1)})
    reads = 'pixels'

    def __init__(self):
        self.calls = []

    def sample(self, text, x=None, generator=None, new_prompt=False):
        given = 0 if x is None else x.shape[2]
        self.calls.append((given, new_prompt))
        out = torch.full((text.shape[0], 1, 3, 1, 1), float(len(self.calls)))
        if x is not None:
            out[:, :, :given] = x
        return out


@pytest.mark.parametrize('turn_context, windows', [(1, [(0, False), (2, False), (1, True), (2, False)]),
                                                   (2, [(0, False), (2, False), (2, True), (2, False), (2, False)])])
def test_story_windows_keep_less_where_the_prompt_changes(turn_context, windows):
    m = WindowRecorder()
    a, b = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    video = sample.sample_long(m, None, [a, b], [4, 7], context=2, turn_context=turn_context)
    assert m.calls == windows
    assert video.shape == (2, 1, 7, 1, 1) and video[0, 0, :3].flatten().tolist() == [1, 1, 1]  # window 1: 0-2
    m = WindowRecorder()  # a part shorter than a window: its window is cut where the next part starts
    video = sample.sample_long(m, None, [a, b, a], [2, 5, 7], context=2, turn_context=1)
    assert m.calls == [(0, False), (1, True), (2, False), (1, True)]
    assert video[0].flatten().tolist() == [1, 1, 2, 2, 3, 4, 4]


class CodesRecorder(WindowRecorder):
    """The same over codes (B, t, h, w) of a tokenizer: records the codes each window is given and makes."""
    reads = 'codes'

    def __init__(self, tok, t):
        super().__init__()
        self.tok, self.t, self.given, self.made = tok, t, [], []

    def sample(self, text, x=None, generator=None, new_prompt=False):
        self.given.append(x)
        h = self.tok.config.resolution // self.tok.config.factors[1]
        out = torch.randint(0, self.tok.codebook_size, (text.shape[0], self.t, h, h), generator=generator)
        if x is not None:
            out[:, :x.shape[1]] = x
        self.made.append(out)
        return out


def test_a_window_continues_from_its_kept_frames_encoded_again():
    """A window is given the tokenizer's codes of the last 1 + ft (keep - 1) frames made, so its first latent frame
    is one frame alone, as in training, not the ft frames of the latent frame as made."""
    tok = tokenizer.Tokenizer(tokenizer.TokenizerConfig(resolution=16, channels=8, levels=(2, 2))).eval()
    ft, m = tok.config.factors[0], CodesRecorder(tok, 3)
    video = sample.sample_long(m, tok, [torch.zeros(1, 4, dtype=torch.long)], [5], context=2,
                               generator=torch.Generator().manual_seed(0))
    assert video.shape == (1, 3, 1 + 4 * ft, 16, 16) and torch.equal(video[:, :, :1 + 2 * ft], tok.decode(m.made[0]))
    assert m.given[0] is None and torch.equal(m.given[1], tok.encode(video[:, :, ft:2 * ft + 1]))


def test_given_first_frames_are_encoded_for_the_model_and_come_back_exactly():
    tok = tokenizer.Tokenizer(tokenizer.TokenizerConfig(resolution=16, channels=8, levels=(2, 2))).eval()
    ft, m = tok.config.factors[0], CodesRecorder(tok, 3)
    image = torch.rand(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    video = sample.sample_long(m, tok, [torch.zeros(2, 4, dtype=torch.long)], [3], context=2, first=image,
                               generator=torch.Generator().manual_seed(0))
    decoded = tok.decode(m.made[0])
    assert torch.equal(m.given[0], tok.encode(image)) and len(m.given) == 1
    assert torch.equal(video[:, :, :1], image) and torch.equal(video[:, :, 1:], decoded[:, :, 1:])
    assert (decoded[:, :, :1] - image).abs().max() > 0.1  # the decoder alone would not give it back
    last = torch.zeros(2, 3, 2, 16, 16)
    both = sample.put_back(decoded, image, last)
    assert torch.equal(both[:, :, :1], image) and torch.equal(both[:, :, -2:], last)
    assert torch.equal(both[:, :, 1:-2], decoded[:, :, 1:-2])


def square(y: int, x: int, size: int = 16) -> torch.Tensor:
    """A frame (3, size, size) in [-1, 1]: black, with a white 5x5 square from (y, x), wrapping round the edges."""
    f = -torch.ones(3, size, size)
    f[:, (torch.arange(y, y + 5) % size)[:, None], (torch.arange(x, x + 5) % size)[None]] = 1
    return f


@pytest.mark.parametrize('y, x', [(0, 0), (14, 3), (6, 14), (15, 15)])
def test_centring_puts_an_object_split_by_the_edges_whole_in_the_middle(y, x):
    shift = sample.centring(square(y, x)[None])
    moved = sample.roll(square(y, x)[None, :, None], shift)[0, :, 0]
    assert torch.equal(moved, square(6, 6))  # the square's middle at 8, 8
    assert torch.equal(sample.roll(moved[None, :, None], -shift)[0, :, 0], square(y, x))
    assert sample.centring(-torch.ones(1, 3, 16, 16)).tolist() == [[0, 0]]  # an empty frame stays


class Still(WindowRecorder):
    """A pixel model whose windows hold their last given frame still, and record what they were given."""
    def sample(self, text, x=None, generator=None, new_prompt=False):
        self.calls.append(x)
        if x is None:
            return square(14, 14)[None, :, None].repeat(text.shape[0], 1, 3, 1, 1)
        return torch.cat([x, x[:, :, -1:].repeat(1, 1, 3 - x.shape[2], 1, 1)], 2)


@pytest.mark.parametrize('centre', [True, False])
def test_centred_windows_see_the_object_whole_and_give_it_back_in_place(centre):
    m = Still()
    video = sample.sample_long(m, None, [torch.zeros(1, 4, dtype=torch.long)], [7], context=1, centre=centre)
    assert video.shape == (1, 3, 7, 16, 16) and all(torch.equal(f, square(14, 14)) for f in video[0].unbind(1))
    assert all(torch.equal(x[0, :, -1], square(6, 6) if centre else square(14, 14)) for x in m.calls[1:])


@pytest.mark.parametrize('parts, frames, ends, spans', [
    (2, 33, [5, 9], [[0, 17], [17, 33]]), (2, 65, [9, 17], [[0, 33], [33, 65]]),
    (3, 33, [3, 6, 9], [[0, 9], [9, 21], [21, 33]]), (3, 65, [6, 12, 17], [[0, 21], [21, 45], [45, 65]]),
    (1, 17, [5], [[0, 17]])])
def test_story_frames_are_shared_in_proportion(parts, frames, ends, spans):
    assert sample.story_split(parts, frames, 4) == ends and sample.part_frames(ends, 4) == spans


def test_story_split_as_given_and_its_errors():
    assert sample.story_split(2, 33, 4, [9, 24]) == [3, 9] and sample.story_split(3, 33, 4, [13, 8, 12]) == [4, 6, 9]
    for parts, frames, split, words in ((2, 33, [17, 17], 'gives 2 parts and 34 frames'),
                                        (2, 33, [16, 17], 'the first prompt takes 1 + 4k frames'),
                                        (3, 33, [17, 16], 'the story has 3 prompts'),
                                        (3, 5, None, 'needs at least 9 frames')):
        with pytest.raises(sample.SampleError, match=re.escape(words)):
            sample.story_split(parts, frames, 4, split)


def test_prompts_as_people_write_them(run_dir, tmp_path, run):
    ar = str(run_dir / 'ar' / 'ckpt.pt')
    meta = train.read_checkpoint(ar)['data_meta']
    assert torch.equal(sample.encode_prompts(['A big RED circle,  moving left!'], meta),
                       sample.encode_prompts(['a big red circle moving left'], meta))
    code, log = run(sample, '--ckpt', ar, '--prompt', 'a big purple circle moving left quickly', '--num_samples', '1',
                    '--out', str(tmp_path / 'w'), '--no_mp4')
    assert code == 0 and "no training caption has 'purple', 'quickly'" in log, log
    code, log = run(sample, '--ckpt', ar, '--prompt', 'Purple zebras, dancing!', '--out', str(tmp_path / 'x'))
    assert code == 2 and 'cannot read it; it knows: a, and, ball' in log and 'Traceback' not in log, log
    assert not os.path.exists(tmp_path / 'x')
    code, log = run(sample, '--ckpt', ar, '--words')
    assert code == 0 and 'circle' in log.split() and 'gliding' in log.split(), log
    code, log = run(sample, '--ckpt', ar, '--num_samples', '1', '--out', str(tmp_path / 'u'), '--no_mp4')
    assert code == 0 and 'no prompt: sampling without text' in log, log
    assert np.load(tmp_path / 'u' / 'unconditional_0.npy').shape == (17, 32, 32, 3)


def test_a_model_of_uncaptioned_videos_samples_without_a_prompt(run_dir, tmp_path, run):
    src = tmp_path / 'film'
    src.mkdir()
    frames = prepare_data.render_shapes(prepare_data.sample_shapes(1, 32, 40, np.random.default_rng(3)), 32)[0]
    iio.imwrite(src / 'reel.gif', frames, duration=125, loop=0)
    data = prepare_data.prepare(prepare_data.get_args(['--dataset', 'folder', '--src', str(src), '--out',
                                                       str(tmp_path / 'data'), '--size', '32', '--stride', '2']))
    assert prepare_data.load_meta(data)['words'] == []
    assert train.main(['--model=prior', '--data', data, '--tokenizer', str(run_dir / 'tok' / 'ckpt.pt'), '--out_dir',
                       str(tmp_path / 'ar'), '--max_iters', '2', '--eval_interval', '100', *PRIOR]) == 0
    film = str(tmp_path / 'ar' / 'ckpt.pt')
    code, log = run(sample, '--ckpt', film, '--num_samples', '2', '--out', str(tmp_path / 's'), '--no_mp4')
    assert code == 0, log
    rec = [json.loads(ln) for ln in open(tmp_path / 's' / 'samples.jsonl')]
    assert len(rec) == 2 and rec[0]['prompt'] == '' and rec[0]['cfg'] == 1.0  # nothing to guide by
    code, log = run(sample, '--ckpt', film, '--prompt', 'a cat', '--out', str(tmp_path / 'p'))
    assert code == 2 and 'trained on videos without captions' in log, log


@pytest.mark.parametrize('argv, words', [
    (['--ckpt', 'missing.pt', '--prompt', 'x'], 'train one with python train.py --model=prior'),
    (['--ckpt', 'TOK', '--prompt', 'x'], 'is a tokenizer checkpoint; sampling needs a generator'),
    (['--story', 'a red ball||a blue ball'], 'has an empty part'),
    (['--story', 'a red ball|a blue ball', '--story_split', '17,17'], 'each later one a multiple of 4'),
    (['--story', 'a red ball|a blue ball|a red ball', '--story_split', '17,16'], 'gives 2 parts and 33 frames'),
    (['--story', 'a red ball|a blue ball', '--story_split', '17,x'], 'takes frames per story prompt'),
    (['--story', 'a red ball|a blue ball', '--story_split', '17,16', '--frames', '65'], 'adds up to 33 frames'),
    (['--prompt', 'a red ball', '--story_split', '17,16'], 'give --story'),
    (['--prompt', 'a ' * 40], 'tokens; this model reads at most'),
    (['--prompt', 'a red ball', '--frames', '20'], '--frames must be 1 + 4k'),
    (['--prompt', 'a red ball', '--guide_frames', '0'], 'guide_frames must be at least 1'),
    (['--story', 'a red ball|a blue ball', '--frames', '33', '--turn_context', '0'], '--turn_context must be between 1'),
    (['--ckpt', 'MASK', '--prompt', 'a red ball', '--guide_frames', '2'], 'guide_frames is a setting of ar priors'),
    (['--prompt', 'a red ball', '--first_steps', '1'], 'first_steps is a setting of mask priors'),
    (['--ckpt', 'MASK', '--prompt', 'a red ball', '--steps', '4', '--first_steps', '4'], 'first_steps must be in [0, steps)'),
    (['--prompt', 'a red ball'] + ['--refine_cfg', '2'], 'refine_cfg is a setting of mask priors'),
    (['--ckpt', 'MASK', '--prompt', 'a red ball', '--refine_steps', '-1'], 'refine_steps must be >= 0'),
    (['--prompt', 'a red ball', '--num_samples', '0'], '--num_samples must be at least 1'),
    (['--prompt', 'a red ball', '--image', 'nowhere.png'], '--image nowhere.png is not a file'),
    (['--prompts', 'nowhere.txt'], '--prompts nowhere.txt is not a file'),
])
def test_sample_errors(run_dir, run, argv, words):
    paths = {'MASK': str(run_dir / 'mask' / 'ckpt.pt'), 'TOK': str(run_dir / 'tok' / 'ckpt.pt')}
    argv = [paths.get(a, a) for a in (argv if '--ckpt' in argv else ['--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), *argv])]
    code, log = run(sample, *argv, '--out', str(run_dir / 'err'))
    assert code == 2 and words in log and 'Traceback' not in log, log


def test_eval_prior_cli(run_dir, tmp_path, run):
    code, log = run(eval_script, '--ckpt', str(run_dir / 'mask' / 'ckpt.pt'), '--n_prompts', '3',
                    '--samples_per_prompt', '1', '--steps', '2', '--json', str(tmp_path / 'acc.json'))
    assert code == 0, log
    acc = json.load(open(tmp_path / 'acc.json'))
    assert acc['all_prompts']['n'] == 3 and 0 <= acc['all_prompts']['all'] <= 1
    assert 'invalid' in acc['all_prompts'] and 'seconds_per_video' in acc
    mistakes, wrong = acc['mistakes'], round((1 - acc['all_prompts']['all']) * 3)  # each wrong video counts once or more
    assert all(m.endswith(' (invalid)') or ' as ' in m for m in mistakes) and 'mistakes:' in log
    assert sum(mistakes.values()) >= wrong and (wrong == 0) == (mistakes == {})
    assert acc['settings']['refine_steps'] == 2 and acc['settings']['first_steps'] == 0  # recorded, not None
    code, log = run(eval_script, '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--refine_steps', '1')
    assert code == 2 and 'refine_steps is a setting of mask priors' in log and 'Traceback' not in log
    code, log = run(eval_script, '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--samples_per_prompt', '0')
    assert code == 2 and '--samples_per_prompt must be at least 1' in log


@pytest.mark.parametrize('dtype, has_bf16, want', [('bfloat16', False, True), ('float32', True, False),
                                                   ('auto', True, True), ('auto', False, False)])
def test_eval_autocasts_the_sampler_as_train_does(run_dir, tmp_path, monkeypatch, run, dtype, has_bf16, want):
    import prior
    seen, sample_fn = [], prior.Prior.sample

    def spy(self, *a, **k):
        seen.append(torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16)
        return sample_fn(self, *a, **k)
    monkeypatch.setattr(prior.Prior, 'sample', spy)
    monkeypatch.setattr(train, 'cpu_has_bf16', lambda: has_bf16)  # auto: bfloat16 only where it is native
    code, log = run(eval_script, '--ckpt', str(run_dir / 'mask' / 'ckpt.pt'), '--n_prompts', '2',
                    '--samples_per_prompt', '1', '--steps', '2', '--dtype', dtype, '--device', 'cpu',
                    '--json', str(tmp_path / 'acc.json'))
    assert code == 0, log
    assert seen and all(s == want for s in seen), seen
    assert json.load(open(tmp_path / 'acc.json'))['settings']['dtype'] == ('bfloat16' if want else 'float32')


def test_prior_without_tokenizer_is_a_clear_error(run_dir, tmp_path, run):
    code, log = run(train, '--model=prior', '--data', str(run_dir / 'shapes'), '--tokenizer',
                    str(tmp_path / 'no.pt'), '--out_dir', str(tmp_path / 'p'), '--max_iters', '1')
    assert code == 2 and 'no checkpoint at' in log and '--model=tokenizer' in log


def test_eval_seen_and_held_out(run_dir, run):
    code, log = run(eval_script, '--ckpt', str(run_dir / 'mask' / 'ckpt.pt'), '--samples_per_prompt', '1',
                    '--steps', '1', '--first_steps', '0', '--refine_steps', '0', '--batch_size', '96', '--json',
                    str(run_dir / 'all.json'))
    assert code == 0, log
    out = json.load(open(run_dir / 'all.json'))
    assert out['all_prompts']['n'] == 192 and out['held_out']['n'] == 8  # green triangles: 2 sizes x 4 motions
    assert out['seen']['n'] == 184
    acc = lambda d: d['all'] * d['n']
    assert acc(out['seen']) + acc(out['held_out']) == pytest.approx(acc(out['all_prompts']))


def test_eval_story_cli(run_dir, tmp_path, run):
    ar = str(run_dir / 'ar' / 'ckpt.pt')
    code, log = run(eval_script, '--ckpt', ar, '--story', '4', '--json', str(tmp_path / 's.json'))
    assert code == 0, log
    out = json.load(open(tmp_path / 's.json'))
    assert out['frames'] == 65 and out['segment_frames'] == [[0, 33], [33, 65]]  # sample.py --story's split
    assert out['centre'] is False
    assert out['segment_1']['n'] == 4 and out['segment_2']['n'] == 4
    n_of = lambda out, part: out.get(f'segment_2_{part}', {'n': 0})['n']  # a part without stories is left out
    assert n_of(out, 'reverse') + n_of(out, 'right_angle') == 4
    assert n_of(out, 'with_room') + n_of(out, 'without_room') == 4
    wrapped = torch.load(ar, weights_only=True)
    wrapped['data_meta']['flags']['wrap'] = 0.25  # trained on objects that wrap round: every one has room
    torch.save(wrapped, tmp_path / 'wrapped.pt')
    code, log = run(eval_script, '--ckpt', str(tmp_path / 'wrapped.pt'), '--story', '4', '--story_frames', '33',
                    '--json', str(tmp_path / 's.json'))
    assert code == 0, log
    out = json.load(open(tmp_path / 's.json'))
    assert n_of(out, 'with_room') == 4 and n_of(out, 'without_room') == 0 and out['centre']  # windows centred
    code, log = run(eval_script, '--ckpt', str(tmp_path / 'wrapped.pt'), '--story', '1', '--story_frames', '33',
                    '--no_centre', '--json', str(tmp_path / 's.json'))
    assert code == 0 and not json.load(open(tmp_path / 's.json'))['centre'], log
    code, log = run(eval_script, '--ckpt', ar, '--story', '1', '--story_frames', '33', '--story_motion', 'opposite',
                    '--json', str(tmp_path / 's.json'))
    assert code == 0, log
    assert json.load(open(tmp_path / 's.json'))['segment_frames'] == [[0, 17], [17, 33]]
    for argv, words in ((['--story_frames', '20'], 'must be 1 + 4k and at least 9'),
                        (['--turn_context', '5'], '--turn_context must be between 1 and 4')):
        code, log = run(eval_script, '--ckpt', ar, '--story', '1', *argv)
        assert code == 2 and words in log and 'Traceback' not in log, log


def test_eval_held_out_phrasings_cli(run_dir, tmp_path, run):
    code, log = run(eval_script, '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--n_prompts', '12',
                    '--phrasing', 'held_out')
    assert code == 2 and 'tokens; this model reads at most 24' in log  # 24 clips' BPE has few merges
    data = str(tmp_path / 'shapes')
    prepare_data.prepare(prepare_data.get_args(['--out', data, '--n_train', '24', '--n_val', '8', '--size', '32',
                                                '--text_len', '48']))
    assert train.main(['--model=prior', '--data', data, '--tokenizer', str(run_dir / 'tok' / 'ckpt.pt'), '--out_dir',
                       str(tmp_path / 'ar'), '--max_iters', '1', '--eval_interval', '100', *PRIOR]) == 0
    code, log = run(eval_script, '--ckpt', str(tmp_path / 'ar' / 'ckpt.pt'), '--n_prompts', '3', '--samples_per_prompt',
                    '1', '--phrasing', 'held_out', '--json', str(tmp_path / 'p.json'))
    assert code == 0 and 'warning' not in log, log
    out = json.load(open(tmp_path / 'p.json'))
    assert out['phrasing'] == 'held_out' and out['all_prompts']['n'] == 3
    rows = {k: v for k, v in out.items() if k.startswith('phrasing_')}  # each wording apart, 3 videos in all
    assert rows and sum(v['n'] for v in rows.values()) == 3 and 'phrasing_' in log
    assert {int(k[9:]) for k in rows} <= set(range(1, len(prepare_data.HELD_OUT_PHRASINGS) + 1))


@pytest.mark.slow
def test_prior_under_ddp(run_dir, tmp_path):
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join(ROOT, 'train.py'), '--model=prior', '--mode=mask', '--data', str(run_dir / 'shapes'),
                        '--tokenizer', str(run_dir / 'tok' / 'ckpt.pt'), '--out_dir', str(tmp_path / 'd'),
                        '--max_iters', '2', '--eval_interval', '100', *PRIOR],
                       capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'world 2' in r.stdout and torch.load(tmp_path / 'd' / 'ckpt.pt', weights_only=True)['iter_num'] == 2


@pytest.mark.slow
def test_pipeline_script(tmp_path):
    env = dict(os.environ, DATA=str(tmp_path / 'data'), TOK_DATA=str(tmp_path / 'tok_data'), OUT=str(tmp_path / 'out'),
               DATA_FLAGS='--n_train 24 --n_val 8 --size 32 --text_len 48',  # held-out phrasings fit a tiny BPE
               TOK_FLAGS='--max_iters 2 --channels 8 --batch_size 2 --eval_iters 1 --dtype float32',
               PRIOR_FLAGS='--max_iters 2 ' + ' '.join(PRIOR), SAMPLE_FLAGS='--num_samples 1 --steps 2',
               SR_FLAGS='--max_iters 2 --channels 8 --n_blocks 1 --batch_size 2 --eval_iters 1 --dtype float32',
               EVAL_FLAGS='--n_prompts 4 --steps 2')
    r = subprocess.run(['bash', os.path.join(ROOT, 'pipeline.sh'), 'mask'], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / 'out' / 'pipeline_mask'
    assert json.load(open(out / 'accuracy.json'))['all_prompts']['n'] == 4
    assert len([f for f in os.listdir(out / 'samples') if f.endswith('.gif')]) == 6
    assert np.load(out / 'samples' / 'a_big_red_circle_moving_left_0.npy').shape == (17, 64, 64, 3)  # upsampled
    assert json.load(open(out / 'accuracy.json'))['superres']['n'] == 4
    assert json.load(open(out / 'accuracy_phrasings.json'))['phrasing'] == 'held_out'
    assert 'done in' in r.stdout
    # the tokenizer learns every combination; the prior only the data with combinations held out
    tok = torch.load(tmp_path / 'out' / 'pipeline_tokenizer' / 'ckpt.pt', weights_only=True)
    assert tok['args']['data'] == str(tmp_path / 'tok_data')
    assert json.load(open(tmp_path / 'tok_data' / 'meta.json'))['holdout'] == ''
    assert json.load(open(tmp_path / 'data' / 'meta.json'))['holdout']
    # a second run reuses the data and resumes both trainings at their end
    r = subprocess.run(['bash', os.path.join(ROOT, 'pipeline.sh'), 'mask'], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count('--resume') == 3 and 'from step 2' in r.stdout
    r = subprocess.run(['bash', os.path.join(ROOT, 'pipeline.sh'), 'gpt'], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and 'usage' in r.stderr
