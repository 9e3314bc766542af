"""Pieces the CWM experiments share (a helper module, not an experiment)."""

import ml_collections

from brainscale import config as config_lib
from experiments import base


def synthetic(*, count: int, seed: int, size: int, frames: int = 24, fps: float = 12.0,
              speed=(0.5, 4.0), camera: float = 1.0, flow_gap: int = 2, objects=(2, 4),
              object_size=(0.15, 0.35), spin: float = 0.08) -> ml_collections.ConfigDict:
  """A set of synthetic physics clips (brainscale/data/synthetic/physics.py:Spec)."""
  return ml_collections.ConfigDict(dict(
      count=count, seed=seed, size=size, frames=frames, fps=fps, speed=speed, camera=camera,
      flow_gap=flow_gap, objects=objects, object_size=object_size, spin=spin))


def tokenizer_model(*, bits: int, channels: int, depth: int = 2,
                    kernel: int = 1) -> ml_collections.ConfigDict:
  """The local patch quantizer: one LFQ code of `bits` bits per 4x4 pixels."""
  m = base.get_config().model
  m.channels = channels
  m.depth = depth
  m.kernel = kernel          # 1: each code sees only its own 4x4 block
  m.bits = bits              # codebook 2 ** bits
  m.quantizer = 'lfq'        # lfq | fsq
  m.patch = 4
  m.commit_weight = 0.25
  m.entropy_weight = 0.1
  return m


def video_data(c, *, size: int, gap_ms: float, train, held_out, scale=(1.0, 1.25)):
  """data.*: '' directories mean the synthetic sets `train` / `held_out`."""
  c.data.directory = ''        # an imported folder (python -m brainscale.data.importers.videos)
  c.data.eval_directory = ''   # held-out clips; with flow for the probes
  c.data.size = size           # training resolution (square crops)
  c.data.gap_ms = gap_ms       # time between the two frames of a pair
  c.data.scale = scale         # random resize of the short side before the crop
  c.data.synthetic = train
  c.data.eval_synthetic = held_out
  c.data.workers = 1


def world_model(c, *, tokenizer: str, layers: int, dim: int, heads: int, vocab: int,
                loss_chunk: int):
  """model.*, tokenizer.*, sequence.*, probe.* and the optimizer groups of a world model.

  Full multi-head attention (head_dim = dim / heads), GELU MLP 4 x dim, untied
  head; `vocab` = 2^bits codes + 2 x patches pointers, padded.
  """
  tok = config_lib.load(tokenizer)
  c.task = 'cwm'
  c.model.layers = layers
  c.model.dim = dim
  c.model.heads = heads
  c.model.head_dim = dim // heads
  c.model.mlp_hidden = 4 * dim
  c.model.qk_norm = True
  c.model.vocab = vocab
  c.model.loss_chunk = loss_chunk
  c.model.rope_base = 100.0
  c.model.latent_embed = True          # content tokens also embed their LFQ latent (bits)
  c.model.latent_head = True           # ... and content logits also score it

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.experiment = tokenizer   # trained first (a prerequisite run), frozen by the trainer
  c.tokenizer.overrides = ()           # '--config.KEY=VALUE' for that run
  c.tokenizer.workdir = ''             # '' = WORKDIR/tokenizer
  c.tokenizer.model = ml_collections.ConfigDict(tok.model.to_dict())  # the run's (config.resolve)
  c.data = tok.data
  c.data.unlock()

  c.sequence = ml_collections.ConfigDict()
  c.sequence.patch = 8                 # pixels per patch side: 1 pointer + 2x2 codes
  c.sequence.frame0_weight = 0.1       # loss weight of frame-0 content (frame 1 has 1)
  c.sequence.reveal = 0.0              # up to this fraction of frame-1 patches come first
                                       # as 'revealed' (no loss), like a probe's context

  c.probe = ml_collections.ConfigDict()
  c.probe.clips = 64                   # held-out clips the eval probes (0: none); past the
                                       # held-out set's size its clips repeat at other start frames
  c.probe.batch = 4
  c.probe.reveal = 0.25                # fraction of frame-1 patches shown to next-frame prediction
  c.probe.flow_points = 16             # KL-traced points per clip (they share its clean pass)
  c.probe.min_motion = 3.0             # ... on cells whose true flow is at least this (pixels)
  c.probe.flow_orders = 4              # random frame-1 patch orders the KL maps average over
                                       # (more points and clips, not orders, narrow flow_epe)
  c.probe.tracking_videos = 0          # TAP-Vid tracking on this many synthetic videos (0: off;
                                       # python -m brainscale.cwm.tracking runs it on its own)
  c.probe.tracking_tracks = 32         # ... with this many tracks each
  c.probe.tracking_protocol = 'gap'    # 'first' | 'gap' (Opt-CWM's constant gap of 5 frames)
  c.probe.occlusion_kl = 0.5           # a point is occluded where its KL mass (nats) is below

  c.train.groups.no_decay = dict(pattern=r'(norm|scale)', lr_scale=1.0, weight_decay=0.0)
