"""Benchmarks: the train-step and evaluation benchmarks run on CPU at a tiny size and write JSON;
their FLOP counts, peak table and PyTorch-peer plumbing give the numbers they should."""

import functools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import evaluate as evaluate_bench
from benchmarks import train_step as step_bench
from configs import base
from ipsr_jax.training import train
from ipsr_jax.evaluation import protocols
from ipsr_jax.models import inception_resnet_v1
from ipsr_jax.models import unet as unet_lib
from tests.conftest import REPO

# The PyTorch peer's torch.utils.flop_counter on the same networks (its first JSON line):
# unet_fwd_flop and emb_fwd_flop_160, per image.
PEER_UNET_FWD_FLOPS = 3_011_510_272
PEER_EMBEDDER_FWD_FLOPS_160 = 2_835_324_608

# The GPU machines have no TensorFlow: the benchmark must not need it. A None entry in
# sys.modules makes `import tensorflow` fail and `importlib.util.find_spec` answer None, as when
# the package is absent.
NO_TF_SITECUSTOMIZE = '''
import sys
for name in ('tensorflow', 'tensorflow_datasets'):
  sys.modules[name] = None
'''


def _bench_env(tmp_path):
  site = tmp_path / 'no_tf'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(NO_TF_SITECUSTOMIZE)
  # Unoptimised XLA:CPU code compiles several times faster; timings are not asserted here.
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='2',
              PYTHONPATH=os.pathsep.join([str(site), str(REPO)]),
              XLA_FLAGS='--xla_backend_optimization_level=0')


def test_train_step_benchmark_runs_tiny_without_tensorflow(tmp_path):
  out = tmp_path / 'step.json'
  cmd = [sys.executable, 'benchmarks/train_step.py', '--config=configs/base.py:tiny',
         '--config.embedder.width=0.125', '--config.embedder.embedding_size=64',
         '--batch_sizes=4', '--precisions=bf16', '--steps=2', '--warmup=1', f'--out={out}']
  proc = subprocess.run(cmd, cwd=REPO, env=_bench_env(tmp_path), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['benchmark'] == 'train_step'
  assert report['device']['platform'] == 'cpu'
  assert report['config']['model']['image_size'] == 32
  (row,) = report['results']
  assert (row['batch_size'], row['precision'], row['steps']) == (4, 'bfloat16', 2)
  assert row['degrade_on_device'] is False
  for key in ('step_s', 'img_s', 'img_s_pipelined', 'img_s_host_fed', 'compile_s', 'tflops'):
    assert row[key] > 0, key
  assert row['img_s'] == pytest.approx(4 / row['step_s'])
  assert row['step_s_p10'] <= row['step_s'] <= row['step_s_p90']
  flops = row['flops_per_image']
  assert flops['jaxpr'] == pytest.approx(flops['jaxpr_conv'] + flops['jaxpr_matmul'])
  # Two independent counts of the same program: XLA's (which skips padding taps) and the jaxpr's.
  assert 0.7 < flops['xla'] / flops['jaxpr'] < 1.3
  # One step: generator fwd + bwd (~3x fwd), embedder fwd on SR and HR + input gradient (~3x).
  analytic = 3 * flops['unet_fwd'] + 3 * flops['embedder_fwd']
  assert 0.9 < flops['jaxpr_conv'] / analytic < 1.15
  assert flops['reference'] is None  # not the paper's model
  assert row['tflops'] == pytest.approx(flops['jaxpr'] * row['img_s'] / 1e12)
  assert row['peak_flops_per_chip'] is None and row['mfu'] is None  # CPU: no peak table entry
  assert row['memory']['compiled']['total_bytes'] > row['memory']['compiled']['argument_bytes'] > 0
  assert np.isfinite(row['final_loss'])
  assert 'batch' in proc.stdout and 'GFLOP/img' in proc.stdout  # the table was printed


def test_paper_step_flops_match_the_design_count():
  """The jaxpr count of the real train_step on the paper's config: 17.5 GFLOP/img (docs/design.md, section 13),
  and forward counts identical to the PyTorch peer's FlopCounter (traced, never compiled)."""
  config = base.get_config()
  batch_size = 2
  generator = unet_lib.from_config(config.model)
  embedder = inception_resnet_v1.InceptionResnetV1()
  tx = train.make_optimizer(config.train, 100)
  state = jax.eval_shape(functools.partial(train.init_state, config, generator, tx))
  embedder_vars = inception_resnet_v1.abstract_variables(embedder)
  image = jax.ShapeDtypeStruct((batch_size, 128, 128, 3), jnp.uint8)
  label = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  batch = {'hr': image, 'lr': image, 'lr_index': label, 'label': label}
  step = functools.partial(train.train_step, config=config, generator=generator, embedder=embedder,
                           tx=tx, degrader=None)
  counts = step_bench.jaxpr_flops(jax.make_jaxpr(step)(state, batch, embedder_vars))
  per_image = (counts['conv'] + counts['dot']) / batch_size
  assert per_image == pytest.approx(step_bench.PAPER_FLOPS_PER_IMAGE, rel=0.02)
  trainer = types.SimpleNamespace(generator=generator, embedder=embedder, embedder_vars=embedder_vars)
  forward = step_bench.forward_flops(trainer, config)
  # The innermost encoder conv (2x2 -> 1x1, 512 -> 512) is a dot over its 4 real taps here
  # (ops/strided_conv.py); torch's counter also counts the 12 taps that fall on padding.
  assert forward['unet_fwd'] == PEER_UNET_FWD_FLOPS - 12 * 512 * 512 * 2
  assert forward['embedder_fwd'] == PEER_EMBEDDER_FWD_FLOPS_160
  assert step_bench.is_paper_model(config)


def test_conv_flops_skip_dilation_zeros():
  """A 4x4 stride-2 transposed conv does in*k*k*cin*cout MACs, not out*k*k*cin*cout; its
  gradients count the same way."""
  x = jnp.zeros((2, 8, 8, 16))
  k = jnp.zeros((4, 4, 16, 32))
  up = lambda x, k: jax.lax.conv_transpose(x, k, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  macs = 2 * 8 * 8 * 4 * 4 * 16 * 32
  fwd = step_bench.jaxpr_flops(jax.make_jaxpr(up)(x, k))
  assert fwd == {'conv': 2.0 * macs, 'dot': 0.0}
  grads = step_bench.jaxpr_flops(jax.make_jaxpr(jax.grad(lambda x, k: up(x, k).sum(), (0, 1)))(x, k))
  assert grads['conv'] == pytest.approx(3 * 2.0 * macs, rel=0.01)  # fwd + input grad + kernel grad
  dot = step_bench.jaxpr_flops(jax.make_jaxpr(lambda a, b: a @ b)(jnp.zeros((3, 5)), jnp.zeros((5, 7))))
  assert dot == {'conv': 0.0, 'dot': 2.0 * 3 * 5 * 7}


def test_peak_flops_table():
  assert step_bench.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert step_bench.peak_flops('NVIDIA H100 80GB HBM3', 'float32') == 494e12  # TF32
  assert step_bench.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert step_bench.peak_flops('NVIDIA H200', 'bfloat16') == 989e12
  assert step_bench.peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert step_bench.peak_flops('TPU v5p', 'bfloat16') == 459e12
  assert step_bench.peak_flops('cpu', 'bfloat16') is None


def test_random_batch_matches_the_pipeline_contract():
  config = base.get_config('tiny')
  rng = np.random.default_rng(0)
  batch = step_bench.random_batch(config, rng)
  assert batch['hr'].shape == batch['lr'].shape == (8, 32, 32, 3) and batch['hr'].dtype == np.uint8
  assert batch['lr_index'].max() < len(config.data.lr_sizes) and batch['lr_index'].dtype == np.int32
  config.data.degrade_on_device = True
  assert 'lr' not in step_bench.random_batch(config, rng)


FAKE_PEER = '''
import json, sys, time
args = sys.argv[1:]
batches = [int(b) for b in args[args.index('--batch') + 1:args.index('--modes')]]
mode = args[args.index('--modes') + 1]
print('compiling...')
print(json.dumps({"device": "fake", "torch": "0", "train_flop_per_img": 17.5e9}), flush=True)
for b in batches:
  if b > 100:
    time.sleep(60)  # the timeout must stop this and keep the rows above
  print(json.dumps({"mode": mode, "batch": b, "step_s": b / 1000.0, "img_s": 1000.0}), flush=True)
'''


def _jax_row(batch_size, img_s, precision='bfloat16'):
  return {'batch_size': batch_size, 'precision': precision, 'img_s': img_s, 'img_s_pipelined': img_s,
          'img_s_host_fed': None, 'step_s': batch_size / img_s, 'tflops': 1.0, 'mfu': 0.25,
          'compile_s': 1.0, 'memory': {'compiled': {'total_bytes': 2**30}, 'device': None},
          'flops_per_image': {'jaxpr': 17.6e9, 'jaxpr_conv': 17.5e9, 'jaxpr_matmul': 0.1e9,
                              'xla': 16.4e9, 'reference': 17.5e9, 'unet_fwd': 3e9,
                              'embedder_fwd': 2.8e9}}


def test_peer_runs_in_a_subprocess_and_gives_ratios(tmp_path):
  peer = tmp_path / 'fake_peer.py'
  peer.write_text(FAKE_PEER)
  result = step_bench.run_peer(str(peer), [64, 256], ['bf16_cl_compile_ro'], steps=3, warmup=1,
                               timeout=5)
  assert result['timed_out']
  assert result['info']['train_flop_per_img'] == 17.5e9
  assert [(r['batch'], r['img_s']) for r in result['rows']] == [(64, 1000.0)]
  rows = [_jax_row(64, 1500.0), _jax_row(256, 3000.0), _jax_row(64, 900.0, 'float32')]
  (ratio,) = step_bench.compare(rows, result)
  assert (ratio['batch_size'], ratio['ratio']) == (64, 1.5)

  # The same through saved files: this script's JSON plus the peer's JSON lines.
  (tmp_path / 'jax.json').write_text(json.dumps({'benchmark': 'train_step', 'results': rows,
                                                 'device': None}))
  (tmp_path / 'peer.jsonl').write_text('\n'.join(json.dumps(r) for r in
                                                 [result['info']] + result['rows']))
  report = step_bench.merge_reports([str(tmp_path / 'jax.json'), str(tmp_path / 'peer.jsonl'),
                                     str(tmp_path / 'absent.json')])
  assert [c['ratio'] for c in report['comparison']] == [1.5]
  text = step_bench.table(report['results'], report['peer'])
  assert '1.50' in text and 'peer GFLOP/img 17.50' in text


def test_lfw_census():
  counts = evaluate_bench.census()
  assert (len(counts), sum(counts)) == (5749, 13233)
  assert sum(1 for c in counts if c >= 4) == 610 and sum(c for c in counts if c >= 4) == 6733
  small = evaluate_bench.census(400)
  assert sum(small) == 400 and sum(1 for c in small if c >= 4) >= 2
  assert set(small) <= set(evaluate_bench.LFW_CENSUS)


def test_evaluate_benchmark_writes_json(tmp_path):
  out = tmp_path / 'evaluate.json'
  report = evaluate_bench.main(['--embedder=tiny', '--num_images=400', '--trials=2', '--sr=copy',
                                '--no_quality', '--embed_images=40', '--embed_repeats=1',
                                f'--out={out}'])
  assert json.loads(out.read_text())['protocol']['wall_s'] == pytest.approx(report['protocol']['wall_s'])
  embed, p = report['embed'], report['protocol']
  assert embed['images'] == 40 and embed['faces_per_s'] > 0 and embed['embedding_size'] == 128
  counts = evaluate_bench.census(400)
  records = evaluate_bench.make_records(counts)
  splits = [protocols.lfw_split(records, seed) for seed in (0, 1)]
  gallery = {r.path for s in splits for r in s.gallery}
  probes = {r.path for s in splits for r in s.all_probes()}
  assert p['images_total'] == len(records) == sum(counts)
  assert p['images_used'] == len(gallery | probes)
  assert p['conditions'] == ['7x6', '14x12', '16x14', '18x16'] and p['trials'] == 2
  # Gallery at HR once; each probe at 112x96 ('hr') once, then bicubic and SR per resolution.
  assert p['embeddings'] == len(gallery) + len(probes) * (1 + 2 * 4)
  assert p['sr_images'] == len(probes) * 4
  assert p['wall_s'] >= p['load_s'] + p['embed_s'] + p['sr_s']
  assert p['methods'] == ['hr', 'bicubic', 'sr', 'sr_concat']
  # An identity SR is the bicubic input, so their rank-1 agree exactly.
  for cond in p['conditions']:
    assert p['rank1'][cond]['sr'] == p['rank1'][cond]['bicubic']


def test_generated_images_and_tiny_embedder_keep_identity():
  records = evaluate_bench.make_records([3, 3])
  images = np.stack([evaluate_bench.generated_image(r) for r in records])
  assert images.shape == (6, 128, 128, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[0], evaluate_bench.generated_image(records[0]))
  v = evaluate_bench.tiny_embed_fn()(images)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
  sim = v @ v.T
  assert sim[0, 1] > sim[0, 3] and sim[3, 4] > sim[3, 0]  # same identity closer than another


def test_profile_summary_counts_one_device_lane(tmp_path):
  """A GPU-shaped Chrome trace: kernels on a stream lane, the same time again on the derived
  'XLA Ops' lane, host events beside them. Only the stream lane counts."""
  import gzip  # pylint: disable=g-import-not-at-top
  meta = lambda pid, tid, kind, name: {'ph': 'M', 'pid': pid, 'tid': tid, 'name': kind,
                                       'args': {'name': name}}
  kernel = lambda tid, name, dur: {'ph': 'X', 'pid': 1, 'tid': tid, 'name': name, 'ts': 0, 'dur': dur}
  events = [meta(1, 0, 'process_name', '/device:GPU:0'), meta(2, 0, 'process_name', '/host:CPU'),
            meta(1, 7, 'thread_name', 'Stream #7(Compute)'), meta(1, 9, 'thread_name', 'XLA Ops'),
            kernel(7, 'sm90_xmma_fprop_implicit_gemm_bf16', 600.0), kernel(7, 'loop_add_fusion', 300.0),
            kernel(7, 'sm90_xmma_fprop_implicit_gemm_bf16', 600.0), kernel(7, 'input_reduce_fusion', 500.0),
            kernel(9, 'fusion.12', 2000.0),
            {'ph': 'X', 'pid': 2, 'tid': 3, 'name': 'PjitFunction', 'ts': 0, 'dur': 99999.0}]
  folder = tmp_path / 'plugins' / 'profile' / 'run'
  folder.mkdir(parents=True)
  with gzip.open(folder / 'host.trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)
  summary = step_bench.profile_summary(str(tmp_path), steps=2)
  assert summary['lanes'] == 'device' and summary['kernels'] == 3
  assert summary['busy_ms_per_step'] == pytest.approx(2.0 / 2)
  assert summary['matmul_share'] == pytest.approx(1200 / 2000)
  first = summary['top'][0]
  assert (first['name'], first['calls_per_step'], first['share']) == (
      'sm90_xmma_fprop_implicit_gemm_bf16', 1.0, pytest.approx(0.6))
  assert '60% in conv/GEMM' in step_bench.format_profile(summary)
  assert step_bench.profile_summary(str(tmp_path / 'none'), steps=1) is None


# --- input pipeline -----------------------------------------------------------------------------

def test_input_pipeline_benchmark_reports_rates_cpu_and_load(tmp_path):
  out = tmp_path / 'input_pipeline.json'
  cmd = [sys.executable, str(REPO / 'benchmarks' / 'input_pipeline.py'), '--workers=0,1',
         '--images=48', '--batch_size=8', '--batches=3', '--repeats=1', '--data=generated',
         f'--out={out}']
  proc = subprocess.run(cmd, cwd=REPO, env=_bench_env(tmp_path), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['data'] == 'generated faces (48 images)' and report['batch_size'] == 8
  rows = {(r['workers'], r['degrade'], r['read_threads'], r['handoff']): r
          for r in report['results']}
  # 0 workers also runs in one thread (read_threads=0): the baseline of worker scaling; workers
  # run with each hand-off.
  assert set(rows) == {(w, m, t, h) for m in ('host', 'device')
                       for w, t, h in ((0, 0, None), (0, 2, None), (1, 2, 'pipe'),
                                       (1, 2, 'shared_memory'))}
  assert report['handoffs'] == ['pipe', 'shared_memory']
  for r in rows.values():
    assert r['faces'] == 24 and r['faces_per_s'] > 0
    # A window shorter than one CPU clock tick counts no CPU time: no rate, 0 cores busy.
    if r['faces_per_cpu_s'] is None:
      assert r['cpu_cores_busy'] == 0
    else:
      assert r['cpu_cores_busy'] == pytest.approx(r['faces_per_s'] / r['faces_per_cpu_s'])
    # Read in one snapshot with the total (the window is a few clock ticks here).
    assert 0 <= r['main_process_cores_busy'] <= r['cpu_cores_busy'] + 1e-9
    assert len(r['load_avg']) == 3 and all(x >= 0 for x in r['load_avg'])
    assert r['faces_per_s_runs'] == [r['faces_per_s']]
    assert r['page_faults_per_face'] is None or r['page_faults_per_face'] >= 0
  # A worker process appears with one worker (beside multiprocessing's resource tracker); read
  # threads are per host, split over the workers.
  children = {w: len(rows[(w, 'host', t, h)]['threads']['children'])
              for w, t, h in ((0, 2, None), (1, 2, 'pipe'))}
  assert children[0] <= 1 and children[1] >= children[0] + 1
  assert rows[(1, 'host', 2, 'pipe')]['read_threads_per_process'] == 2
  # In one thread, the pipeline is the calling thread: Grain starts no reader beside it.
  assert (rows[(0, 'host', 0, None)]['threads']['main'] <
          rows[(0, 'host', 2, None)]['threads']['main'])
  assert report['speedups'] == {}  # no 2-worker rows
  assert report['fresh_page_us'] > 0
  placement = report['degradation_placement']
  assert placement['backend'] == 'cpu' and placement['winner'] in ('host', 'device')
  assert min(placement['host_faces_per_cpu_s'], placement['device_faces_per_cpu_s']) > 0
  assert 'Degradation on this CPU backend: host' in proc.stdout
  ip = report['in_process']
  # Decode + degradation is one pass over the same faces: slower than either phase alone.
  total = ip['decode_and_degrade_faces_per_cpu_s']
  assert 0 < total < min(ip['decode_faces_per_cpu_s'], ip['degrade_faces_per_cpu_s'])
  assert '| workers | degradation | faces/s | faces per CPU-s | cores busy | page faults a face' in proc.stdout
  assert '| 0 (one thread) | host |' in proc.stdout
  assert 'In-process (one thread, no Grain)' in proc.stdout
  assert 'A first-touched 4 KiB page costs' in proc.stdout


def test_input_pipeline_table_gives_the_worker_speedups():
  from benchmarks import input_pipeline  # pylint: disable=import-outside-toplevel
  row = lambda w, mode, fps, threads=2: {
      'workers': w, 'degrade': mode, 'faces_per_s': fps, 'read_threads': threads,
      'faces_per_cpu_s': 2000.0, 'cpu_cores_busy': fps / 2000.0, 'load_avg': [0.5, 0.25, 0.125]}
  rows = [row(0, 'host', 800.0, threads=0), row(0, 'host', 1000.0), row(2, 'host', 1700.0),
          dict(row(2, 'host', 1500.0), handoff='shared_memory'), row(0, 'device', 3000.0)]
  text = input_pipeline.table(rows, None, page_us=2.0)
  assert '| 2 | host | 1700 | 2000 | 0.85 | - | 0.5 / 0.2 / 0.1 |' in text
  assert '| 2 (shared memory) | host | 1500 |' in text
  assert '| 0 (one thread) | host | 800 |' in text
  assert ('host degradation: 2 workers give 1.70x the faces/s of 0 workers, '
          '2.12x of 0 workers in one thread') in text
  assert ('host degradation: 2 workers through shared memory give 1.50x the faces/s of 0 '
          'workers, 1.88x of 0 workers in one thread') in text
  assert 'device degradation: 2 workers' not in text  # no 2-worker device row to compare
  assert '2.00 us of CPU here: 48 us a face' in text
  assert input_pipeline.speedups(rows) == {
      'host': {'vs_0_workers': 1.7, 'vs_0_workers_one_thread': 2.125},
      'host/shared_memory': {'vs_0_workers': 1.5, 'vs_0_workers_one_thread': 1.875}}


def test_onnx_sr_benchmark_times_both_engines_and_checks_parity(tmp_path):
  pytest.importorskip('onnxruntime')
  from benchmarks import onnx_sr  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'onnx_sr.json'
  result = onnx_sr.main(['--config=configs/base.py:tiny', '--weights=random', '--batch=2', '--rounds=1',
                         f'--onnx_dir={tmp_path}', f'--out={out}'])
  assert json.loads(out.read_text())['rows'].keys() == result['rows'].keys() == {
      'jax_sr', 'onnxruntime_sr', 'jax_sr_embed', 'onnxruntime_sr_embed'}
  rows = result['rows']
  assert rows['onnxruntime_sr']['max_abs_diff_vs_jax'] <= 1  # uint8: a rounding tie at most
  assert rows['onnxruntime_sr']['share_of_pixels_differing'] < 1e-3
  assert rows['onnxruntime_sr_embed']['max_abs_diff_vs_jax'] < 1e-4
  assert all(r['img_s'] > 0 and r['images'] == 2 for r in rows.values())
  assert result['onnx_bytes']['sr'] == (tmp_path / 'ipsr_sr.onnx').stat().st_size
  assert result['onnx_bytes']['sr_embed'] > result['onnx_bytes']['sr']
  assert set(result['ratios']) == {'jax/onnxruntime_sr', 'jax/onnxruntime_sr_embed'}


def test_cpu_devices_benchmark_compares_settings_with_equal_outputs(tmp_path):
  from benchmarks import cpu_devices  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'cpu_devices.json'
  result = cpu_devices.main(['--settings=1,2', '--rows=sr', '--sr_config=configs/base.py:tiny', '--weights=random',
                             '--images=4', '--rounds=1', '--peers=', f'--out={out}'])
  assert json.loads(out.read_text())['devices'] == result['devices'] == {'1': 1, '2': 2}
  rows = result['rows']
  assert set(rows) == {'sr [1 devices]', 'sr [2 devices]'}
  assert rows['sr [2 devices]']['max_abs_diff_vs_first'] < 1e-3  # float SR pixels, 0..255
  assert all(r['images'] == 4 and r['img_s'] > 0 and r['threads_busy'] > 0 for r in rows.values())
  assert list(result['ratios']) == ['sr [2 devices] / sr [1]']


def test_cpu_devices_benchmark_runs_an_old_revision(tmp_path):
  """The 'old' setting runs the ipsr_jax of a git revision (HEAD here: any history depth works)."""
  from benchmarks import cpu_devices  # pylint: disable=import-outside-toplevel
  if subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True).returncode:
    pytest.skip('not a git checkout')
  result = cpu_devices.main(['--settings=old,1', '--baseline=HEAD', '--rows=sr', '--sr_config=configs/base.py:tiny',
                             '--weights=random', '--images=4', '--rounds=1', '--peers='])
  old = len(os.sched_getaffinity(0))  # HEAD's own default: one device per core
  assert result['devices'] == {'old': old, '1': 1}
  assert result['code']['1'] == str(REPO / 'ipsr_jax')
  assert result['code']['old'] != result['code']['1'] and result['code']['old'].endswith('/old/ipsr_jax')
  assert set(result['rows']) == {f'sr [old={old} devices]', 'sr [1 devices]'}
  assert result['rows']['sr [1 devices]']['max_abs_diff_vs_first'] < 1e-3  # the same code, run twice
