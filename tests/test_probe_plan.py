"""--mode=probe_plan: cwm_80b's decode step and prefill compiled for one node of 8 H100s.

Needs JAX's CUDA plugin (pip install -r requirements-cuda.txt); skipped without it, and
failed instead under BRAINSCALE_REQUIRE_CUDA=1, as CI sets. One compile per config.
"""

import os

import pytest

from brainscale import config as config_lib
from brainscale.plan import gpu, probe_plan

if not gpu.compiler_available():
  WHY = "JAX's CUDA plugin is not installed: pip install -r requirements-cuda.txt"
  if os.environ.get('BRAINSCALE_REQUIRE_CUDA') == '1':
    pytest.fail(f'{WHY} (BRAINSCALE_REQUIRE_CUDA=1)', pytrace=False)
  pytest.skip(WHY, allow_module_level=True)

GiB = 2 ** 30


@pytest.fixture(scope='module')
def planned_80b():
  return probe_plan.probe_plan(config_lib.resolve('cwm_80b', []))


@pytest.mark.slow
def test_cwm_80b_probes_fit_one_node_of_8_h100s_without_gathering_weights(planned_80b):
  p = planned_80b
  assert p.gpus == 8 and p.gpu.description == 'NVIDIA H100 80GB HBM3'
  assert p.dtype == 'bfloat16' and p.batch >= 1 and p.slots == 10_240
  # bf16 weights split 8 ways (~80B params x 2 bytes / 8), each example's cache by heads
  assert 17 * GiB < p.weights_bytes < 21 * GiB
  assert p.cache_bytes == pytest.approx(96 * 2 * 10_240 * 8 * 128 * 2)
  assert p.fits() and p.used_bytes() <= 0.8 * 80 * GiB and p.examples_that_fit() >= 1
  assert not p.weights_gathered()
  assert p.decode.gathered_bytes() < 2 ** 20   # at most activations, never a weight
  # Decoding one token reads every weight and the cache at least once.
  assert p.token_ms() > 1e3 * (p.weights_bytes + p.cache_bytes) / p.gpu.hbm_bandwidth
  report = p.report()
  assert 'fits: yes' in report and 'weights gathered: no' in report
  assert 'roofline ms per decoded token' in report and 'whole-frame prediction' in report


def test_a_model_that_does_not_decode_is_one_line():
  config = config_lib.resolve('enigma_tiny', ['--config.model.video_layers=1',
                                              '--config.model.decoder_layers=1'])
  with pytest.raises(config_lib.ConfigError, match='plans the probes of a CWM world model'):
    probe_plan.probe_plan(config)
