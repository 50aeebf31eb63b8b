import json
import os
import subprocess
import sys

import pytest
import torch

import eval as eval_script
import prepare_data
import train
from conftest import ROOT


def test_ssim_properties():
    a = torch.rand(3, 3, 32, 32)
    assert torch.allclose(eval_script.ssim(a, a), torch.ones(3), atol=1e-5)
    noisy = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    assert (eval_script.ssim(a, noisy) < 0.9).all()


def test_eval_and_bench_cli(tmp_path):
    data = str(tmp_path / 'shapes')
    prepare_data.prepare(prepare_data.get_args(['--out', data, '--n_train', '16', '--n_val', '6', '--size', '32']))
    out = str(tmp_path / 'tok')
    assert train.main(['--model=tokenizer', '--data', data, '--out_dir', out, '--max_iters', '2', '--channels', '8',
                       '--batch_size', '2', '--eval_iters', '1', '--eval_interval', '100']) == 0
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--ckpt', os.path.join(out, 'ckpt.pt'),
                        '--n', '5', '--batch_size', '2', '--json', str(tmp_path / 'm.json')], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.load(open(tmp_path / 'm.json'))
    assert m['clips'] == 5 and 0 < m['psnr'] < 60 and 0 <= m['ssim'] <= 1 and 0 <= m['reader_accuracy'] <= 1
    assert 0 < m['codebook_used'] <= m['codebook_size'] == 256 and 'psnr' in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--ckpt', str(tmp_path / 'none.pt')],
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'no checkpoint at' in r.stderr and 'Traceback' not in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--channels', '8', '--batch_size', '1',
                        '--frames', '5', '--resolution', '16', '--steps', '1', '--warmup', '1'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'ms/step' in r.stdout and 'clips/s' in r.stdout and 'MFU' in r.stdout and '(32 tokens/clip)' in r.stdout


@pytest.mark.parametrize('mode, flags, tokens', [
    ('ar', [], 12), ('mask', [], 12 + 2 * 8),  # text 4 + video 8; mask: every clip's first frame twice again as an image
    ('mask', ['--image_share', '1'], 12 + 8), ('mask', ['--image_share', '0', '--optimizer', 'muon'], 12)])
def test_bench_prior(mode, flags, tokens):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--model=prior', f'--mode={mode}', '--n_layer', '1',
                        '--n_embd', '32', '--n_head', '2', '--grid', '2,2,2', '--text_len', '4', '--batch_size', '2',
                        '--steps', '1', '--warmup', '1', *flags], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f'({tokens} tokens/clip)' in r.stdout and 'MFU' in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--model=prior', f'--mode={mode}', '--n_layer', '1',
                        '--n_embd', '32', '--n_head', '2', '--grid', '2,2,2', '--text_len', '4', '--batch_size', '2',
                        '--sample', '--cfg', '1'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 's per clip' in r.stdout and ('faster' in r.stdout) == (mode == 'ar') and 'guidance 1 (off' in r.stdout


def test_uncached_baseline_matches_the_cache():
    import bench
    import prior
    torch.manual_seed(0)
    m = prior.Prior(prior.PriorConfig(vocab_size=30, text_vocab=20, text_len=4, grid=(2, 2, 2), n_layer=2, n_head=2,
                                      n_embd=32)).eval()
    text = torch.randint(20, (3, 4))
    for cfg in (1.0, 3.0):
        assert torch.equal(bench.uncached_ar(m, text, cfg).view(3, 2, 2, 2), m.generate(text, temperature=0, cfg=cfg))
