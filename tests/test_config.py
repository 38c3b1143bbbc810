import subprocess
import sys

import pytest

from configs import base
from configs import lfw
from ipsr_jax import config as config_lib
from ipsr_jax.evaluation import protocols
from tests.conftest import REPO


def test_base_config_is_the_paper():
  config = base.get_config()
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.root'):
    config_lib.validate(config)  # the paper's data must be named
  config.data.root = '/data/vggface2_aligned'
  config_lib.validate(config)
  assert config.loss.beta == 5.0 and config.train.learning_rate == 2e-4 and config.train.b1 == 0.5
  assert config.train.batch_size == 64 and config.train.num_epochs == 50
  assert config.model.leaky_relu_slope == 0.3 and config.model.bn_momentum == 0.99
  assert config.model.bn_epsilon == 1e-3 and config.model.init_stddev == 0.02 and config.model.ngf == 64
  assert config.embedder.input_size == 160 and len(config.data.lr_sizes) == 10
  assert tuple(config.data.lr_sizes[0]) == (7, 6) and tuple(config.data.lr_sizes[-1]) == (112, 96)


@pytest.mark.parametrize('field, value, message', [
    ('train.optimizer', 'adagrad', 'config.train.optimizer'),
    ('train.batch_size', 0, 'config.train.batch_size'),
    ('loss.identity_distance', 'l1', 'config.loss.identity_distance'),
    ('data.lr_sizes', ((7, 6), (200, 8)), 'config.data.lr_sizes'),
    ('model.dropout_rate', 1.5, 'config.model.dropout_rate'),
    ('data.source', 'imagenet', 'config.data.source'),
    ('model.num_downs', 9, 'config.model.num_downs'),
    ('train.compute_dtype', 'float16', 'config.train.compute_dtype'),
    ('data.read_threads', -1, 'config.data.read_threads'),
    ('data.worker_buffer_size', 0, 'config.data.worker_buffer_size'),
    ('data.worker_handoff', 'sockets', 'config.data.worker_handoff'),
    ('loss.feature_weight', -0.1, 'config.loss.feature_weight'),
    ('data.random_grey', 1.5, 'config.data.random_grey'),
])
def test_wrong_values_name_the_field(field, value, message):
  config = base.get_config()
  config.data.root = '/data/faces'
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('.', r'\.')):
    config_lib.validate(config)


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'ipsr_jax.main', '--config=configs/base.py', '--workdir=/tmp/x',
                         *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_rejects_bad_and_unknown_values_before_compiling():
  bad = _main('--config.train.optimizer=adagrad', '--config.data.root=/nonexistent')
  assert bad.returncode != 0 and 'config.train.optimizer' in bad.stderr
  unknown = _main('--config.train.not_a_field=1')
  assert unknown.returncode == 1 and 'Traceback' not in unknown.stderr
  assert [l for l in unknown.stderr.splitlines() if l.startswith('Error:')] == [
      "Error: a --config.<field> override names a field the config does not have: \"'not_a_field'\" "
      '(the command line sets existing fields; a config file adds new ones)']
  variant = _main('--config=configs/base.py:nope')
  assert variant.returncode == 1 and 'Traceback' not in variant.stderr
  assert "Error: flag --config=configs/base.py:nope: Error whilst parsing config file: ValueError: configs/base.py: " \
         "unknown variant 'nope' (known: local, tiny)" in variant.stderr


def test_lfw_sizes_are_the_protocols_and_a_flag_scores_fewer():
  config = lfw.get_config()
  for name in ('lfw', 'lfw_dev'):
    assert config.evals[name].resolutions == protocols.PROTOCOLS[name].resolutions
  # The flag parses a tuple of sizes (one size of the test protocol, e.g. for a further seed).
  script = ('from absl import app, flags\nfrom ml_collections import config_flags\n'
            "config_flags.DEFINE_config_file('config')\n"
            'app.run(lambda _: print(flags.FLAGS.config.evals.lfw.resolutions))')
  out = subprocess.run([sys.executable, '-c', script, '--config=configs/lfw.py',
                        '--config.evals.lfw.resolutions=((14,12),(18,16))'],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '((14, 12), (18, 16))'
