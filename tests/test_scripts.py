import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

import bench
import eval as eval_script
import prepare_data
import train

SMALL_PRIOR = ['--model=prior', '--n_layer', '1', '--n_embd', '32', '--n_head', '2', '--grid', '2,2,2', '--text_len', '4',
               '--batch_size', '2']


def test_ssim_properties():
    a = torch.rand(3, 3, 32, 32)
    assert torch.allclose(eval_script.ssim(a, a), torch.ones(3), atol=1e-5)
    noisy = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    assert (eval_script.ssim(a, noisy) < 0.9).all()


def test_eval_and_bench_a_tokenizer(tmp_path, capsys):
    data = str(tmp_path / 'shapes')
    prepare_data.prepare(prepare_data.get_args(['--out', data, '--n_train', '16', '--n_val', '6', '--size', '32']))
    out = str(tmp_path / 'tok')
    assert train.main(['--model=tokenizer', '--data', data, '--out_dir', out, '--max_iters', '2', '--channels', '8',
                       '--batch_size', '2', '--eval_iters', '1', '--eval_interval', '100']) == 0
    assert eval_script.main(['--ckpt', f'{out}/ckpt.pt', '--n', '5', '--batch_size', '2', '--json', str(tmp_path / 'm.json')]) == 0
    m = json.load(open(tmp_path / 'm.json'))
    assert m['clips'] == 5 and 0 < m['psnr'] < 60 and 0 <= m['ssim'] <= 1 and 0 <= m['reader_accuracy'] <= 1
    assert 0 < m['codebook_used'] <= m['codebook_size'] == 256 and 'psnr' in capsys.readouterr().out
    assert eval_script.main(['--ckpt', str(tmp_path / 'none.pt')]) == 2
    err = capsys.readouterr().err
    assert 'no checkpoint at' in err and 'Traceback' not in err
    torch.save({'weights': torch.zeros(1)}, tmp_path / 'other.pt')
    assert eval_script.main(['--ckpt', str(tmp_path / 'other.pt')]) == 2
    assert 'holds no model this repo knows' in capsys.readouterr().err
    ckpt = torch.load(f'{out}/ckpt.pt', weights_only=True)
    ckpt['config']['warp_speed'] = 9
    torch.save(ckpt, tmp_path / 'newer.pt')
    assert eval_script.main(['--ckpt', str(tmp_path / 'newer.pt')]) == 2
    err = capsys.readouterr().err
    assert 'a field this version does not know (warp_speed)' in err and 'Traceback' not in err
    r = bench.main(['--channels', '8', '--batch_size', '1', '--frames', '5', '--resolution', '16', '--iters', '1',
                    '--warmup', '1', '--peak_seconds', '0.05'])
    log = capsys.readouterr().out
    assert r['clips_per_s'] > 0 and r['flops'] > 0 and 'MFU' in log and 'tokens/s' not in log  # tokens: codes only
    with pytest.raises(SystemExit, match='a tokenizer is a codec'):
        bench.main(['--channels', '8', '--sample'])


@pytest.mark.parametrize('mode, flags', [('ar', []), ('mask', []), ('mask', ['--image_share', '0']),
                                         ('ar', ['--optimizer', 'adamw'])])
def test_bench_prior(mode, flags, capsys):
    r = bench.main([*SMALL_PRIOR, f'--mode={mode}', '--iters', '1', '--warmup', '1', '--peak_seconds', '0.05', *flags])
    log = capsys.readouterr().out
    assert '(2, 2, 2)' in log and 'tokens/s' in log and r['mfu'] > 0
    assert f"optimizer {'adamw' if flags[-1:] == ['adamw'] else 'muon'}" in log
    phases = ['forward', 'backward', 'AdamW'] + ([] if flags[-1:] == ['adamw'] else ['Muon'])  # its optimizers
    assert list(r['phases_ms']) == phases and all(t > 0 for t in r['phases_ms'].values())
    assert "median ms of its phases: forward" in log
    r = bench.main([*SMALL_PRIOR, f'--mode={mode}', '--sample', '--cfg', '1'])
    log = capsys.readouterr().out
    assert 's per clip' in log and "'cfg': 1.0" in log and r['per_s'] > 0


def test_bench_times_an_ar_prior_against_a_plain_gpt(capsys):
    r = bench.main([*SMALL_PRIOR, '--mode=ar', '--iters', '2', '--warmup', '1', '--peak_seconds', '0.01'])
    log = capsys.readouterr().out
    assert 'baseline, a plain GPT of the same size' in log and r['ratio'] > 0 and r['baseline_ms'] > 0
    assert f"{r['ratio']:.2f}x its speed" in log
    assert 'ratio' not in bench.main([*SMALL_PRIOR, '--mode=ar', '--iters', '1', '--warmup', '0', '--peak_seconds',
                                      '0.01', '--no-baseline'])
    for flags in (['--mode=mask'], ['--mode=ar', '--sample']):  # a baseline of the ar training step only
        with pytest.raises(SystemExit):
            bench.main([*SMALL_PRIOR, *flags, '--baseline'])
    assert 'ar prior' in capsys.readouterr().err


def test_the_baseline_computes_the_priors_loss():
    from prior import Prior, PriorConfig
    config = PriorConfig(vocab_size=64, text_vocab=50, text_len=5, grid=(2, 3, 3), n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    prior_model, base = Prior(config), bench.PlainGPT(config)
    codes, text = torch.randint(64, (3, 2, 3, 3)), torch.randint(50, (3, 5))
    (logits, loss), (prior_logits, prior_loss) = base(codes, text), prior_model(codes, text)
    assert logits.shape == prior_logits.shape == (3, 18, 64)  # every video token predicted, as the prior does
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten()))
    assert abs(loss.item() - prior_loss.item()) < 0.05 and abs(loss.item() - math.log(64)) < 0.1  # both at chance
    changed = codes.clone().view(3, -1)
    changed[:, 7] = (changed[:, 7] + 1) % 64
    logits2, _ = base(changed.view_as(codes), text)  # causal: token 7 is seen from prediction 8 on
    assert torch.allclose(logits[:, :8], logits2[:, :8], atol=1e-5) and not torch.allclose(logits[:, 8:], logits2[:, 8:])
    adamw, muon = base.configure_optimizers('cpu')  # the prior's rule: Muon for the blocks' matrices
    assert {id(p) for p in muon.param_groups[0]['params']} == {
        id(p) for n, p in base.named_parameters() if n.startswith('blocks.') and p.dim() == 2}
    assert len(bench.PlainGPT(dataclasses.replace(config, optimizer='adamw')).configure_optimizers('cpu')) == 1


def test_bench_steps_each_on_a_new_batch_that_the_models_share():
    # one batch repeated is memorised, and then denormal numbers slow a float32 backward 3x on Intel CPUs
    seen = {'prior': [], 'baseline': []}

    class Spy(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.w = name, torch.nn.Parameter(torch.ones(1))

        def forward(self, x, ids):
            seen[self.name].append(x.clone())
            return None, (self.w * x.float()).mean()

        def configure_optimizers(self, device_type):
            return [torch.optim.SGD(self.parameters(), lr=0.1)]

    batches = iter(torch.arange(5.0).view(5, 1))
    args = SimpleNamespace(device='cpu', compile=False, warmup=1, iters=4)
    no_autocast = torch.autocast('cpu', enabled=False)
    times = bench.time_steps({n: Spy(n) for n in seen}, lambda: (next(batches), None), no_autocast, args)
    assert [x.item() for x in seen['prior']] == [0, 1, 2, 3, 4]  # warm-up and timed steps, each a new batch
    assert all(map(torch.equal, seen['prior'], seen['baseline']))  # the same one for both models
    assert set(times['prior']) == {'step', 'forward', 'backward', 'SGD'}


def test_bench_flops_of_the_image_passes():
    # a mask prior that trains each clip's first frame twice more as an image does more work per step
    flops = {share: bench.main([*SMALL_PRIOR, '--mode=mask', '--iters', '1', '--warmup', '0', '--peak_seconds', '0.01',
                                '--image_share', share])['flops'] for share in ('0', '2')}
    assert flops['2'] > flops['0']


def test_bench_an_upsampler(capsys):
    r = bench.main(['--model=superres', '--channels', '8', '--n_blocks', '1', '--batch_size', '1', '--frames', '3',
                    '--resolution', '16', '--iters', '1', '--warmup', '0', '--peak_seconds', '0.01'])
    assert r['mfu'] > 0 and '(3, 3, 16, 16)' in capsys.readouterr().out
    r = bench.main(['--model=superres', '--channels', '8', '--n_blocks', '1', '--batch_size', '2', '--frames', '3',
                    '--resolution', '16', '--sample'])
    assert r['seconds_per_clip'] > 0 and '768 output pixels per clip' in capsys.readouterr().out  # 3 x 16 x 16
