"""The prior's path end to end on a tiny run: train.py --model=prior, sample.py, eval.py."""
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import prepare_data
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


def run(script, *argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def test_prior_checkpoint_carries_tokenizer_and_codes_are_cached(run_dir):
    ckpt = torch.load(run_dir / 'ar' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_type'] == 'prior' and ckpt['config']['grid'] == (5, 8, 8)
    assert ckpt['tokenizer']['config']['channels'] == 8 and 'vocab_size' in ckpt['data_meta']['text']
    caches = [f for f in os.listdir(run_dir / 'shapes') if '_codes_' in f]
    assert len(caches) == 2  # train and val, encoded once for both modes
    assert os.path.exists(run_dir / 'ar' / 'sample_000002.png')


def test_prior_checkpoint_from_before_rope_loads_without_it(run_dir, tmp_path):
    ckpt = torch.load(run_dir / 'ar' / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['rope'] is True
    new, _ = train.load_model(str(run_dir / 'ar' / 'ckpt.pt'))
    del ckpt['config']['rope']  # as written before rotary positions existed
    torch.save(ckpt, tmp_path / 'old.pt')
    old, _ = train.load_model(str(tmp_path / 'old.pt'))
    assert old.config.rope is False and torch.all(old.rope_sin == 0)
    text, codes = torch.ones(1, old.config.text_len, dtype=torch.long), torch.zeros(1, *old.config.grid, dtype=torch.long)
    assert not torch.allclose(old(text, codes)[0], new(text, codes)[0])


def test_muon_resume_is_exact_and_keeps_its_optimizer(run_dir, tmp_path):
    common = ['--model=prior', '--mode=mask', '--data', str(run_dir / 'shapes'), '--tokenizer', str(run_dir / 'tok' / 'ckpt.pt'),
              '--optimizer', 'muon', '--lr_decay_iters', '4', '--warmup_iters', '1', '--eval_interval', '100', *PRIOR]
    assert train.main([*common, '--out_dir', str(tmp_path / 'a'), '--max_iters', '4']) == 0
    assert train.main([*common, '--out_dir', str(tmp_path / 'b'), '--max_iters', '2']) == 0
    assert train.main([*common, '--out_dir', str(tmp_path / 'b'), '--max_iters', '4', '--resume']) == 0
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in 'ab')
    assert len(b['optimizer']['optimizers']) == 2 and b['iter_num'] == 4  # AdamW's state and Muon's momenta
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    adamw = [c for c in common if c not in ('--optimizer', 'muon')]
    code, log = run('train.py', *adamw, '--optimizer', 'adamw', '--out_dir', str(tmp_path / 'b'), '--max_iters', '6', '--resume')
    assert code == 2 and 'trained with --optimizer muon' in log and 'Traceback' not in log


@pytest.mark.parametrize('mode', ['ar', 'mask'])
def test_sample_cli(run_dir, mode, tmp_path):
    out = tmp_path / 's'
    code, log = run('sample.py', '--ckpt', str(run_dir / mode / 'ckpt.pt'), '--prompt', 'a big red circle moving left',
                    '--num_samples', '2', '--seed', '1', '--out', str(out), '--steps', '4')
    assert code == 0, log
    assert 's per video' in log
    for f in ('a_big_red_circle_moving_left_0.gif', 'a_big_red_circle_moving_left_1.mp4',
              'a_big_red_circle_moving_left.png', 'samples.jsonl'):
        assert os.path.exists(out / f), f
    v = np.load(out / 'a_big_red_circle_moving_left_0.npy')
    assert v.shape == (17, 32, 32, 3) and v.dtype == np.uint8
    rec = [json.loads(ln) for ln in open(out / 'samples.jsonl')]
    assert len(rec) == 2 and rec[0]['prompt'] == 'a big red circle moving left' and rec[0]['seed'] == 1
    assert rec[0]['cfg'] is not None and rec[0]['guide_frames'] == (1 if mode == 'ar' else None)
    assert rec[0]['first_steps'] == (None if mode == 'ar' else 1)  # a third of --steps 4
    assert rec[0]['refine_steps'] == (None if mode == 'ar' else 2)  # the mode's default
    assert rec[0]['refine_cfg'] == (None if mode == 'ar' else 1.0)
    # the same seed reproduces the same video
    code, _ = run('sample.py', '--ckpt', str(run_dir / mode / 'ckpt.pt'), '--prompt', 'a big red circle moving left',
                  '--num_samples', '2', '--seed', '1', '--out', str(tmp_path / 's2'), '--steps', '4', '--no_mp4')
    assert code == 0 and np.array_equal(v, np.load(tmp_path / 's2' / 'a_big_red_circle_moving_left_0.npy'))


def test_long_story_and_image(run_dir, tmp_path):
    img = tmp_path / 'first.png'
    iio.imwrite(img, prepare_data.render_shapes(prepare_data.sample_shapes(1, 64, 2, np.random.default_rng(0)), 64)[0, 0])
    code, log = run('sample.py', '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--story',
                    'a red circle moving left|a red circle moving up', '--frames', '33', '--num_samples', '1',
                    '--out', str(tmp_path / 'o'), '--no_mp4', '--image', str(img))
    assert code == 0, log
    npys = [f for f in os.listdir(tmp_path / 'o') if f.endswith('.npy')]
    assert len(npys) == 1 and np.load(tmp_path / 'o' / npys[0]).shape == (33, 32, 32, 3)
    rec = json.loads(open(tmp_path / 'o' / 'samples.jsonl').readline())
    assert rec['windows'][0] == 'a red circle moving left' and rec['windows'][-1] == 'a red circle moving up'
    code, log = run('sample.py', '--ckpt', str(run_dir / 'mask' / 'ckpt.pt'), '--prompt', 'a red circle moving left',
                    '--num_samples', '1', '--steps', '3', '--out', str(tmp_path / 'm'), '--no_mp4', '--image', str(img))
    assert code == 0, log
    assert json.loads(open(tmp_path / 'm' / 'samples.jsonl').readline())['refine_steps'] == 0  # the given frame stays


@pytest.mark.parametrize('argv, words', [
    (['--ckpt', 'missing.pt', '--prompt', 'x'], 'train one with python train.py --model=prior'),
    (['--prompt', '  '], 'empty prompt'),
    (['--prompt', 'a ' * 40], 'tokens; this model reads at most'),
    (['--prompt', 'a red ball', '--frames', '20'], '--frames must be 1 + 4k'),
    (['--prompt', 'a red ball', '--guide_frames', '0'], 'guide_frames must be at least 1'),
    (['--story', 'a red ball|a blue ball', '--frames', '33', '--turn_context', '0'], '--turn_context must be between 1'),
    (['--ckpt', 'MASK', '--prompt', 'a red ball', '--guide_frames', '2'], '--guide_frames is for ar priors'),
    (['--prompt', 'a red ball', '--first_steps', '1'], '--first_steps is for mask priors'),
    (['--ckpt', 'MASK', '--prompt', 'a red ball', '--steps', '4', '--first_steps', '4'], 'first_steps must be in [0, steps)'),
    (['--prompt', 'a red ball', '--refine_steps', '1'], '--refine_steps is for mask priors'),
    (['--prompt', 'a red ball', '--refine_cfg', '2'], '--refine_cfg is for mask priors'),
    (['--ckpt', 'MASK', '--prompt', 'a red ball', '--refine_steps', '-1'], 'refine_steps must be >= 0'),
])
def test_sample_errors(run_dir, argv, words):
    if '--ckpt' not in argv:
        argv = ['--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), *argv]
    argv = [str(run_dir / 'mask' / 'ckpt.pt') if a == 'MASK' else a for a in argv]
    code, log = run('sample.py', *argv, '--out', str(run_dir / 'err'))
    assert code == 2 and words in log and 'Traceback' not in log, log
    code, log = run('sample.py', '--ckpt', str(run_dir / 'tok' / 'ckpt.pt'), '--prompt', 'x')
    assert code == 2 and 'needs a prior' in log


@pytest.mark.parametrize('mode, flag', [('mask', '--guide_frames'), ('ar', '--first_steps'), ('ar', '--refine_steps'),
                                        ('ar', '--refine_cfg')])
def test_eval_flags_of_the_other_mode_are_errors(run_dir, mode, flag):
    code, log = run('eval.py', '--ckpt', str(run_dir / mode / 'ckpt.pt'), flag, '1')
    assert code == 2 and f'{flag} is for {"ar" if mode == "mask" else "mask"} priors' in log and 'Traceback' not in log, log


def test_eval_prior_cli(run_dir, tmp_path):
    code, log = run('eval.py', '--ckpt', str(run_dir / 'mask' / 'ckpt.pt'), '--n_prompts', '3',
                    '--samples_per_prompt', '1', '--steps', '2', '--json', str(tmp_path / 'acc.json'))
    assert code == 0, log
    acc = json.load(open(tmp_path / 'acc.json'))
    assert acc['all_prompts']['n'] == 3 and 0 <= acc['all_prompts']['all'] <= 1
    assert 'invalid' in acc['all_prompts'] and 'seconds_per_video' in acc
    assert acc['settings']['refine_steps'] == 2 and acc['settings']['first_steps'] == 0  # recorded, not None
    assert acc['settings']['refine_cfg'] == 1.0


def test_eval_dtype_autocasts_the_sampler(run_dir, tmp_path, monkeypatch):
    import eval as eval_lib
    import prior
    seen, generate = [], prior.Prior.generate

    def spy(self, *a, **k):
        seen.append(torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16)
        return generate(self, *a, **k)
    monkeypatch.setattr(prior.Prior, 'generate', spy)
    # auto (the default) is bfloat16 only on a CPU that has it natively, as in train.py
    for dtype, has_bf16, want in (('bfloat16', False, True), ('float32', True, False), ('auto', True, True),
                                  ('auto', False, False)):
        seen.clear()
        monkeypatch.setattr(train, 'cpu_has_bf16', lambda: has_bf16)
        assert eval_lib.main(['--ckpt', str(run_dir / 'mask' / 'ckpt.pt'), '--n_prompts', '2', '--samples_per_prompt',
                              '1', '--steps', '2', '--dtype', dtype, '--json', str(tmp_path / 'acc.json')]) == 0
        assert seen and all(s == want for s in seen), (dtype, has_bf16, seen)
        assert json.load(open(tmp_path / 'acc.json'))['settings']['dtype'] == ('bfloat16' if want else 'float32')


def test_prior_without_tokenizer_is_a_clear_error(run_dir, tmp_path):
    code, log = run('train.py', '--model=prior', '--data', str(run_dir / 'shapes'), '--tokenizer', str(tmp_path / 'no.pt'),
                    '--out_dir', str(tmp_path / 'p'), '--max_iters', '1')
    assert code == 2 and 'no checkpoint at' in log and '--model=' in log


def test_prior_under_ddp(run_dir, tmp_path):
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join(ROOT, 'train.py'), '--model=prior', '--mode=mask', '--data', str(run_dir / 'shapes'),
                        '--tokenizer', str(run_dir / 'tok' / 'ckpt.pt'), '--out_dir', str(tmp_path / 'd'),
                        '--max_iters', '2', '--eval_interval', '100', *PRIOR],
                       capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'world 2' in r.stdout and torch.load(tmp_path / 'd' / 'ckpt.pt', weights_only=True)['iter_num'] == 2


def test_eval_seen_and_held_out(run_dir):
    import eval as eval_lib
    model, ckpt = train.load_model(str(run_dir / 'mask' / 'ckpt.pt'), 'cpu')
    out = eval_lib.eval_prior(model, ckpt, 192, 1, 96, 'cpu', 0, steps=1)
    assert out['all_prompts']['n'] == 192 and out['held_out']['n'] == 8  # green triangles: 2 sizes x 4 motions
    assert out['seen']['n'] == 184
    acc = lambda d: d['all'] * d['n']
    assert acc(out['seen']) + acc(out['held_out']) == pytest.approx(acc(out['all_prompts']))


def test_eval_story_cli(run_dir, tmp_path):
    code, log = run('eval.py', '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--story', '2', '--json', str(tmp_path / 's.json'))
    assert code == 0, log
    out = json.load(open(tmp_path / 's.json'))
    # 65 frames = 17 latent frames in windows of 5 keeping 3 (1 where the prompt changes); the second prompt
    # from the second window on
    assert out['frames'] == 65 and out['segment_frames'] == [[0, 17], [17, 65]]
    assert out['segment_1']['n'] == 2 and out['segment_2']['n'] == 2
    code, log = run('eval.py', '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--story', '1', '--story_cut', '0',
                    '--json', str(tmp_path / 's.json'))
    assert code == 0, log  # the even split of sample.py --story: the last 3 windows for the second prompt
    assert json.load(open(tmp_path / 's.json'))['segment_frames'] == [[0, 41], [41, 65]]
    code, log = run('eval.py', '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--story', '1', '--story_cut', '20')
    assert code == 2 and 'one of [17, 25, 33, 41, 49, 57]' in log and 'Traceback' not in log, log
    code, log = run('eval.py', '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--story', '2', '--story_frames', '49',
                    '--story_cut', '41')
    assert code == 2 and 'fewer than 17 frames' in log and 'Traceback' not in log, log
    code, log = run('eval.py', '--ckpt', str(run_dir / 'ar' / 'ckpt.pt'), '--story', '1', '--turn_context', '5')
    assert code == 2 and '--turn_context must be between 1 and 4' in log and 'Traceback' not in log, log


def test_pipeline_script(tmp_path):
    env = dict(os.environ, DATA=str(tmp_path / 'data'), TOK_DATA=str(tmp_path / 'tok_data'), OUT=str(tmp_path / 'out'),
               DATA_FLAGS='--n_train 24 --n_val 8 --size 32',
               TOK_FLAGS='--max_iters 2 --channels 8 --batch_size 2 --eval_iters 1 --dtype float32',
               PRIOR_FLAGS='--max_iters 2 ' + ' '.join(PRIOR), SAMPLE_FLAGS='--num_samples 1 --steps 2',
               EVAL_FLAGS='--n_prompts 4 --steps 2')
    r = subprocess.run(['bash', os.path.join(ROOT, 'pipeline.sh'), 'mask'], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / 'out' / 'pipeline_mask'
    assert json.load(open(out / 'accuracy.json'))['all_prompts']['n'] == 4
    assert len([f for f in os.listdir(out / 'samples') if f.endswith('.gif')]) == 6
    assert 'done in' in r.stdout
    # the tokenizer learns every combination; the prior only the data with combinations held out
    tok = torch.load(tmp_path / 'out' / 'pipeline_tokenizer' / 'ckpt.pt', weights_only=True)
    assert tok['args']['data'] == str(tmp_path / 'tok_data')
    assert json.load(open(tmp_path / 'tok_data' / 'meta.json'))['holdout'] == ''
    assert json.load(open(tmp_path / 'data' / 'meta.json'))['holdout']
    # a second run reuses the data and resumes both trainings at their end
    r = subprocess.run(['bash', os.path.join(ROOT, 'pipeline.sh'), 'mask'], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count('--resume') == 2 and 'from step 2' in r.stdout
    r = subprocess.run(['bash', os.path.join(ROOT, 'pipeline.sh'), 'gpt'], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and 'usage' in r.stderr
