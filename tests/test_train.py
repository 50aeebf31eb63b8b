import os
import subprocess
import sys

import pytest
import torch

import prepare_data
import train
from conftest import ROOT

TINY = ['--channels', '8', '--levels', '4,3,3', '--batch_size', '2', '--eval_iters', '1', '--dtype', 'float32']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('data') / 'shapes')
    prepare_data.prepare(prepare_data.get_args(['--out', out, '--n_train', '32', '--n_val', '8', '--size', '32']))
    return out


def run_train(capsys, *argv):
    """train.main in this process, as the command line would run it: (exit code, what it printed)."""
    try:
        code = train.main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_end_to_end(data, tmp_path):
    out = str(tmp_path / 'tok')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--model=tokenizer', '--data', data, '--out_dir',
                        out, '--max_iters', '4', '--eval_interval', '2', '--log_interval', '2', *TINY],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'iter 2 loss' in r.stdout and 'val_loss' in r.stdout and 'clips_per_s' in r.stdout
    for f in ('ckpt.pt', 'log.jsonl', 'sample_000002.png', 'sample_000004.gif'):
        assert os.path.exists(os.path.join(out, f)), f
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['model_type'] == 'tokenizer' and ckpt['iter_num'] == 4 and ckpt['config']['channels'] == 8
    assert ckpt['config']['batch_size'] == 2 and ckpt['config']['max_iters'] == 4  # the recipe it trained with
    model = train.load_model(train.read_checkpoint(os.path.join(out, 'ckpt.pt')), 'cpu')
    assert model.encode(torch.zeros(1, 3, 17, 32, 32)).shape == (1, 5, 8, 8)


def test_exact_resume(data, tmp_path):
    common = ['--model=tokenizer', '--data', data, '--lr_decay_iters', '6', '--warmup_iters', '2',
              '--eval_interval', '100', '--log_interval', '100', '--ema', '0.9', *TINY]
    assert train.main([*common, '--out_dir', str(tmp_path / 'a'), '--max_iters', '6']) == 0
    assert train.main([*common, '--out_dir', str(tmp_path / 'b'), '--max_iters', '3']) == 0
    assert train.main([*common, '--out_dir', str(tmp_path / 'b'), '--max_iters', '6', '--resume']) == 0
    a = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)
    assert b['iter_num'] == 6
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
        assert torch.equal(a['ema'][k], b['ema'][k]), k


def test_resume_refuses_mismatches_and_takes_a_new_recipe(data, tmp_path, capsys):
    out = str(tmp_path / 't')
    base = ['--model=tokenizer', '--data', data, '--out_dir', out, '--eval_interval', '100', *TINY]
    assert train.main([*base, '--max_iters', '2']) == 0
    code, log = run_train(capsys, *base, '--max_iters', '4', '--resume', '--channels', '16')
    assert code == 2 and 'trained with --channels 8; drop --channels' in log and 'Traceback' not in log
    code, log = run_train(capsys, *base, '--max_iters', '4', '--resume', '--weight_decay', '0.1')
    assert code == 2 and 'drop --weight_decay' in log  # AdamW's state would keep the old one
    code, log = run_train(capsys, *base, '--max_iters', '4', '--resume', '--resolution', '16')
    assert code == 2 and 'trained on data' in log
    # a resumed run may change its lr, batch, length and EMA; the checkpoint records them
    assert train.main([*base, '--max_iters', '3', '--resume', '--lr', '5e-4', '--batch_size', '3', '--ema', '0.5']) == 0
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] == 3 and (ckpt['config']['lr'], ckpt['config']['batch_size']) == (5e-4, 3)
    assert ckpt['ema'] is not None
    ckpt['model_type'] = 'prior'
    torch.save(ckpt, os.path.join(out, 'ckpt.pt'))
    code, log = run_train(capsys, *base, '--max_iters', '4', '--resume')
    assert code == 2 and 'is a prior checkpoint' in log
    code, log = run_train(capsys, *base[:-len(TINY)], '--out_dir', str(tmp_path / 'none'), '--resume')
    assert code == 2 and 'no checkpoint at' in log and 'or drop --resume' in log


@pytest.mark.parametrize('flags, words', [
    (['--batch_size', '0'], '--batch_size must be at least 1'),
    (['--ema', '1'], '--ema must be in [0, 1)'),
    (['--resolution', '24'], 'must divide the data size'),
    (['--levels', '1,5'], 'FSQ levels'),
    (['--quantizer', 'vq'], "'fsq' or 'lfq'"),
    (['--data', 'nowhere'], 'not a dataset'),
    (['--optimizer', 'muon'], "the tokenizer trains with optimizer 'adamw'"),
    (['--first_prob', '0.5'], '--first_prob was removed; use --image_share'),
    (['--beta1', '0.8'], '--beta1 was removed; use --betas B1,B2'),
    (['--levels', 'a,b'], 'expected comma-separated ints'),
    (['--down_time', '1,maybe'], 'expected comma-separated bools'),
])
def test_bad_flags(data, tmp_path, capsys, flags, words):
    code, log = run_train(capsys, '--model=tokenizer', '--data', data, '--out_dir', str(tmp_path / 'o'), '--max_iters',
                          '1', *flags)
    assert code == 2 and words in log and 'Traceback' not in log, log
    assert not os.path.exists(tmp_path / 'o' / 'ckpt.pt')


def test_bool_tuples_parse_words_and_digits():
    parse = train.parse_tuple(bool)
    assert parse('1,0') == parse('True,false') == parse('yes, no') == (True, False)


def test_nan_stops_and_keeps_last_good_checkpoint(data, tmp_path, capsys):
    out = str(tmp_path / 'n')
    base = ['--model=tokenizer', '--data', data, '--out_dir', out, '--eval_interval', '100', '--log_interval', '1', *TINY]
    assert train.main([*base, '--max_iters', '2']) == 0
    good = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    code, log = run_train(capsys, *base, '--max_iters', '6', '--resume', '--lr', '1e30', '--grad_clip', '0')
    assert code == 2 and 'loss is nan' in log.lower() and 'last good checkpoint' in log
    after = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert after['iter_num'] == 2 and all(torch.equal(good['model'][k], after['model'][k]) for k in good['model'])


@pytest.mark.parametrize('has_bf16', [False, True])
def test_auto_dtype_is_bfloat16_only_on_cpus_that_have_it(data, tmp_path, monkeypatch, has_bf16):
    monkeypatch.setattr(train, 'cpu_has_bf16', lambda: has_bf16)  # AVX2-only CPUs emulate bfloat16 ~100x slower
    args = [a for a in TINY if a not in ('--dtype', 'float32')]
    assert train.main(['--model=tokenizer', '--data', data, '--out_dir', str(tmp_path), '--max_iters', '1',
                       '--device', 'cpu', *args]) == 0
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['args']['dtype'] == ('bfloat16' if has_bf16 else 'float32')


def test_auto_dtype_on_gpus_without_native_bfloat16_is_float16(monkeypatch):
    # torch.cuda.is_bf16_supported() counts emulation by default: a T4 or V100 would get slow bfloat16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: including_emulation)
    assert train.auto_dtype('auto', 'cuda:0') == 'float16' and train.auto_dtype('bfloat16', 'cuda') == 'bfloat16'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    assert train.auto_dtype('auto', 'cuda') == 'bfloat16'


def test_training_on_cpu_flushes_denormals(data, tmp_path):
    # a float32 matmul that reads denormals ran 200x slower on an Intel Xeon: they count as zero (as in TensorFlow)
    torch.set_flush_denormal(False)
    try:
        tiny = torch.tensor([1e-39])
        assert (tiny * 1).item() > 0  # this CPU keeps denormals unless told otherwise
        assert train.main(['--model=tokenizer', '--data', data, '--out_dir', str(tmp_path), '--max_iters', '1',
                           '--device', 'cpu', *TINY]) == 0
        assert (tiny * 1).item() == 0
    finally:
        torch.set_flush_denormal(False)


def test_models_load_for_inference_channels_last_on_cpu(data, tmp_path):
    # as they train on CPU: oneDNN's 3D convolutions run faster so (the tokenizer encodes 1.3x as fast)
    assert train.main(['--model=tokenizer', '--data', data, '--out_dir', str(tmp_path), '--max_iters', '1', *TINY]) == 0
    tok = train.load_model(torch.load(tmp_path / 'ckpt.pt', weights_only=True), 'cpu')
    kernels = [m.weight for m in tok.modules() if isinstance(m, torch.nn.Conv3d) and m.weight[0, 0].numel() > 1]
    assert kernels and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in kernels)


def test_compile_asks_for_the_compiler_its_device_needs(monkeypatch):
    monkeypatch.setattr(train.shutil, 'which', lambda name: name == 'clang')  # a C compiler, no C++ one
    assert train.missing_compiler('cuda:0') is None and 'C++ compiler on CPU' in train.missing_compiler('cpu')
    monkeypatch.setattr(train.shutil, 'which', lambda name: name == 'g++')  # Triton's launchers need gcc or clang
    assert train.missing_compiler('cpu') is None and 'C compiler on CUDA' in train.missing_compiler('cuda')


def test_ddp_wraps_before_compile():
    import torch.distributed as dist
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        m = torch.nn.Linear(2, 2)
        model, ddp_model = train.wrap(m, ddp=True, compile=True, device_id=None)
        # compiled around DDP: the graph breaks at DDP's buckets, so their all-reduce overlaps the backward
        assert isinstance(ddp_model, train.DDP) and ddp_model.module is m and model._orig_mod is ddp_model
    finally:
        dist.destroy_process_group()
    assert train.wrap(m, ddp=False, compile=False, device_id=None) == (m, None)


def test_compile_without_a_cpp_compiler_trains_eagerly(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.shutil, 'which', lambda name: None)  # torch.compile on CPU needs g++ or clang++
    assert train.main(['--model=tokenizer', '--data', data, '--out_dir', str(tmp_path), '--max_iters', '1',
                       '--device', 'cpu', '--compile', *TINY]) == 0
    assert 'needs a C++ compiler' in capsys.readouterr().err
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['args']['compile'] is False


def torchrun(*argv):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(ROOT, 'train.py'), *argv], capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.mark.slow
def test_ddp_two_processes_match_one(data, tmp_path):
    common = [f'--data={data}', '--model=tokenizer', '--max_iters', '3', '--eval_interval', '100', '--log_interval', '100',
              '--channels', '8', '--levels', '4,3,3', '--eval_iters', '1', '--dtype', 'float32', '--warmup_iters', '1',
              '--crop', '0']  # whole frames: each rank draws its crops from its own stream, as it does dropout
    assert train.main([*common, '--out_dir', str(tmp_path / 'one'), '--batch_size', '4']) == 0
    r = torchrun(*common, '--out_dir', str(tmp_path / 'two'), '--batch_size', '2')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'world 2' in r.stdout
    one = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)['model']
    two = torch.load(tmp_path / 'two' / 'ckpt.pt', weights_only=True)['model']
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.slow
def test_ddp_gan_step(data, tmp_path):
    r = torchrun(f'--data={data}', '--model=tokenizer', '--max_iters', '2', '--out_dir', str(tmp_path / 'gan'),
                 '--gan_weight', '0.1', '--disc_start', '0', '--gen_start', '0', '--disc_channels', '8', '--log_interval',
                 '1', '--eval_interval', '100', *TINY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'g_adv' in r.stdout and ' d ' in r.stdout
    ckpt = torch.load(tmp_path / 'gan' / 'ckpt.pt', weights_only=True)
    assert any(k.startswith('disc.') for k in ckpt['model'])
