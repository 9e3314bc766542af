# python launch/run.py --experiment=enigma_tiny_adapt
"""New-session adaptation: enigma_tiny's core, frozen, fitted to the session it never saw.

Only the neuron, session and animal embeddings train. Trains enigma_tiny first
(in runs/enigma_tiny, or adapt.workdir) if it has not been trained.
"""

from experiments import _enigma, enigma_tiny


def get_config():
  c = enigma_tiny.get_config()
  _enigma.adapt(c, 'enigma_tiny', sessions=('a2s1',))
  c.train.steps = 300
  c.train.eval_every = c.checkpoint.every_steps = 300
  c.train.learning_rate = 1e-2
  c.evaluation.sessions = 1
  return c
