"""Every model in train.py's table keeps the one interface that train.py, sample.py, eval.py and bench.py use."""
import dataclasses
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import bench
import train

TINY = {  # a model added to train.MODELS gets a tiny config here, and these tests check it
    'tokenizer': dict(channels=8, levels=(4, 3, 3)),
    'prior': dict(n_layer=1, n_embd=32, n_head=2, vocab_size=30, text_vocab=20, text_len=4, grid=(2, 2, 2), batch_size=2),
    'superres': dict(channels=8, n_blocks=2, batch_size=2),
    'diffusion': dict(in_channels=4, grid=(3, 4, 4), text_vocab=20, text_len=4, channels=32, head_dim=16, text_dim=32,
                      num_res_blocks=1, attn_res=4, batch_size=2),
}


@pytest.mark.parametrize('name', list(train.MODELS))
def test_interface(name, tmp_path):
    cfg_cls, model_cls = train.MODELS[name]
    assert model_cls.reads in ('pixels', 'codes', 'latents') and model_cls.kind in ('codec', 'generator', 'upsampler')
    config = cfg_cls(**TINY[name])
    assert {'optimizer', 'lr', 'weight_decay', 'betas', 'batch_size', 'max_iters', 'ema'} <= set(vars(config))
    torch.manual_seed(0)
    model = model_cls(config)
    x, ids = bench.fake_batch(model, config, SimpleNamespace(device='cpu', frames=5, resolution=16))
    model.init_from_data(x, ids)
    out, loss = model(x, ids, 0)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and loss.requires_grad and isinstance(model.last_losses, dict)
    optimizers = model.configure_optimizers('cpu')
    assert isinstance(optimizers, list) and all(isinstance(o, torch.optim.Optimizer) for o in optimizers)
    owned = [id(p) for o in optimizers for g in o.param_groups for p in g['params']]
    assert sorted(owned) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss.backward()
    for o in optimizers:
        o.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a checkpoint of plain values loads with weights_only into the same model
    torch.save(dict(model_type=name, model=model.state_dict(), ema=None, config=dataclasses.asdict(config)),
               tmp_path / 'ckpt.pt')
    loaded = model_cls.from_checkpoint(torch.load(tmp_path / 'ckpt.pt', weights_only=True)).eval()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # a generator makes what it trains on from text; a codec reconstructs the x it is given; an upsampler makes x
    # from a smaller copy
    g = torch.Generator().manual_seed(0)
    if loaded.kind == 'upsampler':
        s = config.scale
        made = loaded.sample(ids, x=torch.nn.functional.avg_pool3d(x, (1, s, s))[:, :, ::config.scale_t], generator=g)
    else:
        made = loaded.sample(ids, x=None if loaded.kind == 'generator' else x, generator=g)
    assert made.shape == x.shape and made.dtype == x.dtype


def test_model_files_import_alone(tmp_path):
    # each model file in a folder of its own, imported with nothing else of the repo on the path
    files = sorted({sys.modules[cls.__module__].__file__ for _, cls in train.MODELS.values()})
    code = ['import importlib.util']
    for i, f in enumerate(files):
        os.makedirs(tmp_path / str(i))
        shutil.copy(f, tmp_path / str(i))
        name = os.path.basename(f)[:-3]
        code.append(f"s = importlib.util.spec_from_file_location('{name}', r'{tmp_path / str(i) / (name + '.py')}'); "
                    f"s.loader.exec_module(importlib.util.module_from_spec(s)); print('{name} ok')")
    os.makedirs(tmp_path / 'empty')
    r = subprocess.run([sys.executable, '-c', '\n'.join(code)], cwd=tmp_path / 'empty', capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': ''})
    assert r.stdout.split() == [w for f in files for w in (os.path.basename(f)[:-3], 'ok')], r.stderr
