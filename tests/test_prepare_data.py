import collections
import gzip
import io
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from contextlib import redirect_stderr, redirect_stdout

import prepare_data as pd
from conftest import ROOT


def run(*argv, cwd=None):
    """prepare_data.py's command line, in this process: (exit code, stdout + stderr)."""
    out, here = io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with redirect_stdout(out), redirect_stderr(out):
            code = pd.main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    finally:
        os.chdir(here)
    return code, out.getvalue()


@pytest.mark.parametrize('size', [32, 64])
def test_reader_recovers_every_combination(size):
    drawn = pd.sample_shapes(5000, size, 17, np.random.default_rng(size))  # every combination, at random places
    clips = list({tuple(c['attrs'].values()): c for c in reversed(drawn)}.values())
    assert len(clips) == len(pd.COMBOS)
    for c, v in zip(clips, pd.render_shapes(clips, size)):
        got = pd.read_clip(v)
        assert got['valid'], (c['attrs'], got)
        assert {a: got[a] for a in pd.ATTRIBUTES} == c['attrs']


@pytest.mark.parametrize('size', [32, 64])
def test_reader_follows_objects_round_the_wrapped_canvas(size):
    clips = pd.sample_shapes(80, size, 17, np.random.default_rng(size), wrap=1.0)
    videos = pd.render_shapes(clips, size)
    def on_opposite_edges(v):  # per frame: the object is on the left and right (or top and bottom) edges at once
        fg = v.max(-1) > 90
        return (fg[:, :, 0].any(-1) & fg[:, :, -1].any(-1)) | (fg[:, 0].any(-1) & fg[:, -1].any(-1))
    assert sum(on_opposite_edges(v).any() for v in videos) > 25  # objects cross the edges, drawn in two parts
    assert not any(on_opposite_edges(v[:1]).any() for v in videos)  # but start whole, as every clip does
    for c, v in zip(clips, videos):
        got = pd.read_clip(v)
        assert got['valid'] and {a: got[a] for a in pd.ATTRIBUTES} == c['attrs'], (c['attrs'], got)
    plain = pd.sample_shapes(200, size, 17, np.random.default_rng(size))  # without wrap: as before, all inside
    assert not any(c['wrap'] for c in plain)
    assert not any(on_opposite_edges(v).any() for v in pd.render_shapes(plain, size))


def test_reader_on_downsampled_clips():
    rng = np.random.default_rng(1)
    clips = pd.sample_shapes(64, 64, 17, rng)
    x = pd.to_model(pd.render_shapes(clips, 64), resolution=32)  # what base models train on
    small = ((x.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert small.shape == (64, 17, 32, 32, 3)
    for c, v in zip(clips, small):
        got = pd.read_clip(v)
        assert got['valid'] and {a: got[a] for a in pd.ATTRIBUTES} == c['attrs']


def test_to_model_area_averages_into_channels_first_floats():
    clips = np.random.default_rng(3).integers(0, 256, (2, 5, 8, 8, 3), dtype=np.uint8)
    x = pd.to_model(clips, resolution=4)
    assert x.shape == (2, 3, 5, 4, 4) and x.dtype == torch.float32 and x.is_contiguous()
    blocks = clips.astype(np.float64).reshape(2, 5, 4, 2, 4, 2, 3).mean((3, 5))  # (B, T, h, w, 3)
    np.testing.assert_allclose(x.permute(0, 2, 3, 4, 1).numpy(), blocks / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(pd.to_model(clips).permute(0, 2, 3, 4, 1).numpy(), clips / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match='must divide'):
        pd.to_model(clips, resolution=3)


def test_reader_flags_invalid_videos():
    rng = np.random.default_rng(2)
    a, b = pd.sample_shapes(2, 64, 17, rng)
    va, vb = pd.render_shapes([a, b], 64)
    assert pd.read_clip(np.zeros_like(va)) == {'valid': False, 'reason': 'no object in frame 0'}
    apart = pd.sample_shapes(200, 64, 17, rng)  # find a second clip whose object never overlaps the first's
    for c in apart:
        vc = pd.render_shapes([c], 64)[0]
        if not ((va.max(-1) > 0) & (vc.max(-1) > 0)).any():
            assert 'several objects' in pd.read_clip(np.maximum(va, vc))['reason']
            break
    else:
        pytest.fail('no non-overlapping pair drawn')
    flicker = va.copy()
    flicker[8] = 0
    assert 'no object in frame 8' == pd.read_clip(flicker)['reason']
    static = np.repeat(va[:1], 17, 0)
    assert 'no clear motion' in pd.read_clip(static)['reason']
    recolour = va.copy()
    recolour[9:] = recolour[9:, :, :, ::-1]  # RGB -> BGR from frame 9 on
    assert not pd.read_clip(recolour)['valid']
    with pytest.raises(ValueError, match='H = W'):
        pd.read_clip(va[:, :, :40])


def test_caption_accuracy_counts():
    rng = np.random.default_rng(3)
    clips = pd.sample_shapes(4, 32, 17, rng)
    videos = pd.render_shapes(clips, 32)
    prompts = [pd.caption(c['attrs']) for c in clips]
    prompts[1] = prompts[1].replace(clips[1]['attrs']['motion'], 'left' if clips[1]['attrs']['motion'] != 'left' else 'right')
    videos[3] = 0
    mistakes = collections.Counter()
    acc = pd.caption_accuracy(videos, prompts, mistakes)
    assert acc['n'] == 4 and acc['invalid'] == 0.25 and acc['all'] == 0.5
    assert acc['color'] == acc['shape'] == acc['size'] == 0.75 and acc['motion'] == 0.5
    asked = pd.parse_caption(prompts[1])['motion']  # what went wrong: the motion asked and read, the empty video
    assert mistakes == {f"{asked} as {clips[1]['attrs']['motion']}": 1, 'no object (invalid)': 1}


def test_shapes_format_round_trip_holdout_and_paraphrases(tmp_path):
    out = tmp_path / 'shapes'
    code, log = run('--out', str(out), '--n_train', '400', '--n_val', '40', '--size', '32',
                    '--holdout', 'green triangle, small cyan')
    assert code == 0, log
    meta = pd.load_meta(str(out))
    assert meta['counts'] == {'train': 400, 'val': 40} and meta['frames'] == 17 and meta['size'] == 32
    train = pd.load_split(str(out), 'train')
    assert train['clips'].shape == (400, 17, 32, 32, 3) and train['clips'].dtype == np.uint8
    assert train['ids'].shape == (400, 24) and len(train['captions']) == 400
    enc = pd.get_encoding(meta['text'])
    pad = meta['text']['pad_id']
    for i in range(0, 400, 37):  # stored clips, ids and captions agree with each other
        got = pd.read_clip(train['clips'][i])
        assert got['valid'] and pd.parse_caption(train['captions'][i]) == {a: got[a] for a in pd.ATTRIBUTES}
        ids = [t for t in train['ids'][i] if t != pad]
        assert enc.decode(ids) == ' ' + pd.normalize_text(train['captions'][i])  # punctuation out, as prompts
    for cap in train['captions']:  # held-out combinations never reach train
        attrs = pd.parse_caption(cap)
        assert not (attrs['color'] == 'green' and attrs['shape'] == 'triangle')
        assert not (attrs['size'] == 'small' and attrs['color'] == 'cyan')
    canonical = sum(cap == pd.CANONICAL.format(**pd.parse_caption(cap)) for cap in train['captions'])
    assert 0.35 < canonical / 400 < 0.65
    assert any(w in ' '.join(train['captions']) for w in ('large', 'ball', 'box', 'plus', 'tiny'))
    x, ids = pd.get_batch(train, 5, resolution=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 17, 16, 16) and x.min() >= -1 and x.max() <= 1 and ids.dtype == torch.long
    # same flags: reused; other flags: refused without --force
    code, log = run('--out', str(out), '--n_train', '400', '--n_val', '40', '--size', '32',
                    '--holdout', 'green triangle, small cyan')
    assert code == 0 and 'reusing' in log
    code, log = run('--out', str(out), '--n_train', '300', '--n_val', '40', '--size', '32')
    assert code == 2 and '--force' in log and 'n_train' in log
    # a flag left out of older datasets at its default (--wrap): the difference named both ways, no traceback
    for wrap, diff in (('0.25', 'wrap: None -> 0.25'), ('0', 'wrap: 0.25 -> None')):
        code, log = run('--out', str(out), '--n_train', '400', '--n_val', '40', '--size', '32', '--wrap', wrap,
                        '--holdout', 'green triangle, small cyan')
        assert code == 2 and diff in log and 'Traceback' not in log, log
        if wrap == '0.25':
            assert run('--out', str(out), '--n_train', '400', '--n_val', '40', '--size', '32', '--wrap', wrap,
                       '--holdout', 'green triangle, small cyan', '--force')[0] == 0
    code, log = run('--out', str(out), '--n_train', '300', '--n_val', '40', '--size', '32', '--force')
    assert code == 0 and pd.load_meta(str(out))['counts']['train'] == 300
    assert sorted(os.listdir(tmp_path)) == ['shapes']  # no temporary directories left behind


def test_held_out_phrasings_never_reach_train(tmp_path):
    code, log = run('--out', str(tmp_path / 'h'), '--n_train', '300', '--n_val', '8', '--size', '16', '--frames', '3')
    assert code == 0, log
    meta = pd.load_meta(str(tmp_path / 'h'))
    words = {w for c in pd.load_split(str(tmp_path / 'h'), 'train')['captions'] for w in pd.normalize_text(c).split()}
    assert meta['holdout_phrasings'] and not words & set(pd.HELD_OUT_WORDS)
    assert len(words - set(meta['words'])) > 5  # made-up words are in captions but not in the words the model knows
    assert set(meta['words']) <= pd.shapes_words(True) and {'gliding', 'there', 'large'} <= set(meta['words'])
    code, log = run('--out', str(tmp_path / 'all'), '--n_train', '300', '--n_val', '8', '--size', '16', '--frames', '3',
                    '--no-holdout_phrasings')
    assert code == 0, log
    words = {w for c in pd.load_split(str(tmp_path / 'all'), 'train')['captions'] for w in pd.normalize_text(c).split()}
    assert words & set(pd.HELD_OUT_WORDS) and not pd.load_meta(str(tmp_path / 'all'))['holdout_phrasings']


def test_every_phrasing_names_its_attributes():
    rng = np.random.default_rng(0)
    for combo in pd.COMBOS:
        attrs = dict(zip(pd.ATTRIBUTES, combo))
        for _ in range(10):
            assert pd.parse_caption(pd.caption(attrs, rng)) == attrs
            assert pd.parse_caption(pd.held_out_caption(attrs, rng)) == attrs
    assert pd.caption(attrs) == pd.CANONICAL.format(**attrs)


def test_held_out_phrasing_names_the_wording_of_a_prompt():
    rng = np.random.default_rng(0)
    for combo in pd.COMBOS[::7]:
        attrs = dict(zip(pd.ATTRIBUTES, combo))
        for i, template in enumerate(pd.HELD_OUT_PHRASINGS):
            assert pd.held_out_phrasing(template.format(**pd.synonyms(attrs, rng))) == i
        assert pd.held_out_phrasing(pd.caption(attrs)) == -1
        assert pd.held_out_phrasing(pd.caption(attrs, rng, held_out_share=0.0)) == -1


def test_text_normalisation_gives_the_clean_prompts_ids():
    meta = pd.make_text_meta([pd.caption(dict(zip(pd.ATTRIBUTES, c))) for c in pd.COMBOS], 'bpe', 300, 24)
    raw = '  A Big,  RED circle... moving LEFT!\n'
    clean, messy = pd.text_tokens(['a big red circle moving left', raw], meta)
    assert clean == messy and pd.get_encoding(meta).encode_ordinary(raw) != clean
    assert pd.normalize_text("The ball's (tiny) box;up") == "the ball's tiny box up"


def test_a_word_is_one_token_wherever_it_stands():
    meta = pd.make_text_meta([pd.caption(dict(zip(pd.ATTRIBUTES, c))) for c in pd.COMBOS], 'bpe', 512, 24)
    word, first, last = pd.text_tokens(['left', 'left goes a red circle', 'a red circle goes left'], meta)
    assert len(word) == 1 and first[0] == last[-1] == word[0] and sorted(first) == sorted(last)
    old = dict(meta, normalize=True)  # datasets written before: no space before the first word, as trained
    assert pd.text_tokens(['left goes'], old)[0] == pd.get_encoding(meta).encode_ordinary('left goes')


def test_bpe_round_trip():
    texts = ['a big red circle moving left', 'the small cyan cross moves up'] * 20
    ranks = pd.train_bpe(texts, 300)
    assert 256 < len(ranks) <= 300
    meta = dict(name='t', pat_str=pd.PAT_STR, ranks=pd.ranks_to_text(ranks), special_tokens={pd.PAD: len(ranks)})
    enc = pd.get_encoding(meta)
    for t in texts[:2] + ['unseen words, 123 and UPPER case!']:
        assert enc.decode(enc.encode(t)) == t
    assert len(enc.encode(texts[0])) < len(texts[0]) / 3  # merges learnt whole words


def test_text_len_cut_is_reported(tmp_path):
    code, log = run('--out', str(tmp_path / 'd'), '--n_train', '20', '--n_val', '4', '--size', '16', '--text_len', '3')
    assert code == 0, log
    meta = pd.load_meta(str(tmp_path / 'd'))
    assert meta['captions_cut'] == {'train': 20, 'val': 4} and 'captions cut' in log


def write_video(path, frames, fps):
    if path.endswith('.gif'):
        iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    else:
        iio.imwrite(path, frames, fps=fps)


def test_folder_source(tmp_path):
    src = tmp_path / 'vids'
    src.mkdir()
    rng = np.random.default_rng(0)
    clips = pd.render_shapes(pd.sample_shapes(2, 64, 40, rng), 64)  # 40 frames each
    write_video(str(src / 'a.mp4'), np.pad(clips[0], ((0, 0), (0, 0), (16, 16), (0, 0))), 16)  # 64x96, 16 fps
    write_video(str(src / 'b.gif'), clips[1], 8)
    (src / 'broken.mp4').write_bytes(b'not a video at all' * 50)
    (src / 'a.txt').write_text('the first video\n')
    code, log = run('--dataset', 'folder', '--src', str(src), '--out', str(tmp_path / 'd'), '--size', '32',
                    '--frames', '9', '--stride', '4', '--fps', '8', '--val_frac', '0.25')
    assert code == 0, log
    assert 'broken.mp4' in log and '1 unreadable' in log
    meta = pd.load_meta(str(tmp_path / 'd'))
    # a.mp4: 40 frames at 16 fps -> 20 at 8 fps -> starts 0,4,8; b.gif: 40 at 8 fps -> starts 0..28 (8 clips)
    assert meta['counts']['train'] + meta['counts']['val'] <= 11 and meta['counts']['val'] >= 2
    tr = pd.load_split(str(tmp_path / 'd'), 'train')
    assert tr['clips'].shape[1:] == (9, 32, 32, 3)
    assert set(tr['captions']) == {'the first video', ''}
    assert meta['report']['captioned_videos'] == 1 and len(meta['report']['skipped']) == 1
    # the GIF's first clip is its first 9 frames shrunk from 64 to 32 (the centre crop is the whole canvas)
    b = [c for c, cap in zip(tr['clips'], tr['captions']) if cap == ''][0]
    want = ((pd.to_model(clips[1][None, :9], 32)[0].permute(1, 2, 3, 0) + 1) * 127.5).numpy()
    assert np.abs(b.astype(np.float32) - want).mean() < 4


def test_folder_captions_jsonl_and_single_file(tmp_path):
    src = tmp_path / 'v'
    src.mkdir()
    frames = pd.render_shapes(pd.sample_shapes(1, 32, 30, np.random.default_rng(1)), 32)[0]
    write_video(str(src / 'clip.mp4'), frames, 8)
    (src / 'captions.jsonl').write_text(json.dumps({'file': 'clip.mp4', 'caption': 'a shape'}) + '\n')
    code, log = run('--dataset', 'folder', '--src', str(src / 'clip.mp4'), '--out', str(tmp_path / 'd'),
                    '--size', '32', '--frames', '9', '--stride', '3')
    assert code == 0, log
    tr = pd.load_split(str(tmp_path / 'd'), 'train')
    assert set(tr['captions']) == {'a shape'}
    code, log = run('--dataset', 'folder', '--src', str(src), '--out', str(tmp_path / 'e'), '--size', '32')
    assert code == 0 and 'unconditional' not in log  # captions.jsonl applies to the directory too


def test_folder_without_captions_is_unconditional(tmp_path):
    src = tmp_path / 'v'
    src.mkdir()
    write_video(str(src / 'x.gif'), pd.render_shapes(pd.sample_shapes(1, 32, 30, np.random.default_rng(2)), 32)[0], 8)
    code, log = run('--dataset', 'folder', '--src', str(src), '--out', str(tmp_path / 'd'), '--size', '16', '--frames', '5')
    assert code == 0 and 'unconditional' in log
    assert set(pd.load_split(str(tmp_path / 'd'), 'train')['captions']) == {''}


def write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
    with (gzip.open if path.endswith('.gz') else open)(path, 'wb') as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_from_idx_files(tmp_path):
    src = tmp_path / 'mnist'
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n, gz in (('train', 30, True), ('t10k', 10, False)):
        write_idx(str(src / f'{prefix}-images-idx3-ubyte') + ('.gz' if gz else ''), rng.integers(0, 256, (n, 28, 28)))
        write_idx(str(src / f'{prefix}-labels-idx1-ubyte') + ('.gz' if gz else ''), np.arange(n) % 10)
    code, log = run('--dataset', 'mnist', '--src', str(src), '--out', str(tmp_path / 'd'), '--n_train', '12', '--n_val', '4')
    assert code == 0, log
    tr = pd.load_split(str(tmp_path / 'd'), 'train')
    assert tr['clips'].shape == (12, 17, 64, 64, 3)
    assert (tr['clips'][..., 0] == tr['clips'][..., 2]).all() and tr['clips'].max() > 0
    words = set(pd.DIGIT_WORDS) | set('0123456789')
    for cap in tr['captions']:
        a, conj, b = cap.split()
        assert conj == 'and' and a in words and b in words
    (src / 't10k-labels-idx1-ubyte').unlink()
    code, log = run('--dataset', 'mnist', '--src', str(src), '--out', str(tmp_path / 'e'))
    assert code == 2 and 't10k-labels-idx1-ubyte' in log and not (tmp_path / 'e').exists()


@pytest.mark.parametrize('argv, words', [
    (['--dataset', 'folder'], 'needs --src'),
    (['--dataset', 'folder', '--src', 'NOPE'], 'does not exist'),
    (['--dataset', 'folder', '--src', 'EMPTY'], 'holds no videos'),
    (['--dataset', 'folder', '--src', 'BAD'], 'no clips'),
    (['--dataset', 'folder', '--src', 'SHORT', '--frames', '17'], 'shorter than --frames'),
    (['--size', '8'], '--size must be at least 16'),
    (['--n_train', '0'], '--n_train must be at least 1'),
    (['--fps', '0'], '--fps must be positive'),
    (['--holdout', 'purple circle'], "unknown word 'purple'"),
    (['--text_encoding', 'nope'], 'not a tiktoken encoding'),
    (['--vocab_size', '100'], '--vocab_size must be at least 257'),
    (['--wrap', '1.5'], '--wrap is a share of the clips'),
    (['--edges', '0.5', '--wrap', '0.75'], 'at most 1 together'),
])
def test_bad_input_clear_error_and_nothing_written(tmp_path, argv, words):
    (tmp_path / 'EMPTY').mkdir()
    (tmp_path / 'BAD').mkdir()
    (tmp_path / 'BAD' / 'x.mp4').write_bytes(b'junk')
    (tmp_path / 'SHORT').mkdir()
    write_video(str(tmp_path / 'SHORT' / 's.gif'), np.zeros((4, 32, 32, 3), np.uint8) + 100, 8)
    code, log = run(*argv, '--out', str(tmp_path / 'out'), '--n_val', '2', cwd=tmp_path)
    assert code == 2 and words in log, log
    assert 'Traceback' not in log and len(log.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_unknown_dataset_is_refused(tmp_path):
    code, log = run('--dataset', 'cifar', '--out', str(tmp_path / 'o'))
    assert code == 2 and 'invalid choice' in log


def test_interrupted_write_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []

    def dying_render(clips, size):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed halfway through
        return real(clips, size)
    real = pd.render_shapes
    monkeypatch.setattr(pd, 'render_shapes', dying_render)
    args = pd.get_args(['--out', str(tmp_path / 'shapes'), '--n_train', '3000', '--n_val', '4', '--size', '16'])
    with pytest.raises(KeyboardInterrupt):
        pd.prepare(args)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_killed_process_leaves_old_dataset_intact(tmp_path):
    out = str(tmp_path / 'shapes')
    assert run('--out', out, '--n_train', '50', '--n_val', '5', '--size', '16')[0] == 0
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'prepare_data.py'), '--out', out, '--force',
                          '--n_train', '200000', '--n_val', '5', '--size', '16'],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    p.stderr.read(1)  # the progress bar has started: the new dataset is being written
    p.kill()
    p.wait()
    assert pd.load_meta(out)['counts']['train'] == 50  # the last good dataset is whole
    assert pd.read_clip(pd.load_split(out, 'train')['clips'][0])['valid']
    assert run('--out', out, '--n_train', '60', '--n_val', '5', '--size', '16', '--force')[0] == 0
    assert sorted(os.listdir(tmp_path)) == ['shapes']  # the killed run's leftovers were cleaned


def test_mnist_download_checks_checksums(tmp_path, monkeypatch):
    mirror = tmp_path / 'mirror'
    mirror.mkdir()
    rng = np.random.default_rng(1)
    md5 = {}
    for prefix, n in (('train', 20), ('t10k', 8)):
        for kind, arr in (('images-idx3', rng.integers(0, 256, (n, 28, 28))), ('labels-idx1', np.arange(n) % 10)):
            name = f'{prefix}-{kind}-ubyte'
            write_idx(str(mirror / name) + '.gz', arr)
            md5[name] = pd.hashlib.md5((mirror / (name + '.gz')).read_bytes()).hexdigest()
    monkeypatch.setattr(pd, 'MNIST_URL', mirror.as_uri() + '/')  # a local mirror: no network in tests
    monkeypatch.setattr(pd, 'MNIST_FILES', md5)
    args = pd.get_args(['--dataset', 'mnist', '--out', str(tmp_path / 'data' / 'mnist'), '--n_train', '6', '--n_val', '2'])
    assert pd.load_meta(pd.prepare(args))['counts'] == {'train': 6, 'val': 2}
    assert sorted(os.listdir(tmp_path / 'data' / 'mnist_raw')) == sorted(n + '.gz' for n in md5)
    monkeypatch.setattr(pd, 'MNIST_FILES', dict(md5, **{'t10k-images-idx3-ubyte': '0' * 32}))
    args = pd.get_args(['--dataset', 'mnist', '--out', str(tmp_path / 'data' / 'm2'), '--n_train', '6', '--n_val', '2'])
    with pytest.raises(pd.DataError, match='checksum'):
        pd.prepare(args)
    assert not (tmp_path / 'data' / 'm2').exists()
