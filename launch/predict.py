"""Counterfactual predictions of a trained CWM world model on a video (or two images) of yours.

  python launch/predict.py --workdir=runs/cwm_tiny [--step=N] [--dtype=bfloat16] \\
      (--video=clip.mp4 [--start_s=0.0] [--gap_ms=MS] | --frames=a.png,b.png) \\
      [--reveal=0.25] [--move=X0,Y0:X1,Y1] [--points='X,Y;X,Y'] [--sequential] \\
      [--decode=mean|argmax|sample] [--temperature=1.0] [--top_k=0] [--top_p=1.0] \\
      [--seed=0] [--orders=4] --out=DIR

The frames are cropped as evaluation crops clips (short side resized to the model's
frame size, centre crop); --move and --points are pixels of that crop, as
DIR/panel.png shows it. Writes DIR/prediction.npz and DIR/panel.png
(brainscale/cwm/predict.py). The params are loaded alone, in --dtype (default the
run's inference.dtype), on the run's inference mesh of this machine's devices
(brainscale.inspect.load); --workdir may be an export (python -m brainscale.export).
A bad input is one line on stderr, `brainscale: ...`, and exit status 2; --traceback
shows the Python traceback as well.

Examples (a run trained with `brainscale --experiment=cwm_tiny`):

  python launch/predict.py --workdir=runs/cwm_tiny --video=clip.mp4 --start_s=1.5 \\
      --move=12,20:30,20 --points='20,22;36,10' --out=/tmp/pred
  python launch/predict.py --workdir=runs/cwm_tiny --frames=a.png,b.png --decode=sample \\
      --out=/tmp/pred
"""

import sys

from absl import app, flags

from brainscale import inspect
from brainscale.cwm import predict
from brainscale.cwm.model import WorldModel
from brainscale.data.importers import InputError
from launch import errors, usage
from launch.errors import fail

flags.DEFINE_string('workdir', '', 'a CWM run folder (launch/run.py --workdir)')
flags.DEFINE_integer('step', None, 'checkpoint step; default the newest')
flags.DEFINE_string('dtype', None, "the params' dtype (e.g. bfloat16); default the run's "
                    'inference.dtype')
flags.DEFINE_string('video', '', 'a video file: the two frames come from it')
flags.DEFINE_float('start_s', 0.0, 'time of the first frame in the video (seconds)')
flags.DEFINE_float('gap_ms', None, "time between the frames; default the run's data.gap_ms")
flags.DEFINE_string('frames', '', 'two image files A,B instead of --video')
flags.DEFINE_float('reveal', 0.25, 'fraction of frame-1 patches shown to the prediction')
flags.DEFINE_string('move', '', 'X0,Y0:X1,Y1: show the frame-0 patch at X0,Y0 at X1,Y1 in frame 1')
flags.DEFINE_string('points', '', "'X,Y;X,Y': points of frame 0 to trace the flow of")
flags.DEFINE_bool('sequential', False, 'decode hidden patches one after another, not in parallel')
flags.DEFINE_enum('decode', 'mean', ['mean', 'argmax', 'sample'], 'how predicted codes are shown')
flags.DEFINE_float('temperature', 1.0, '--decode=sample: softmax temperature')
flags.DEFINE_integer('top_k', 0, '--decode=sample: sample among the k likeliest codes (0: all)')
flags.DEFINE_float('top_p', 1.0, '--decode=sample: ... among the likeliest codes of this mass')
flags.DEFINE_integer('seed', 0, 'draws the revealed patches, the samples and the KL orders')
flags.DEFINE_integer('orders', 4, 'frame-1 patch orders the KL maps of --points average over')
flags.DEFINE_string('out', '', 'folder for prediction.npz and panel.png')
flags.DEFINE_bool('traceback', False, 'show the Python traceback of an expected failure too')
FLAGS = flags.FLAGS


def load():
  """The --workdir checkpoint (brainscale.inspect.Run), if it holds a CWM world model."""
  run = inspect.load(FLAGS.workdir, FLAGS.step, dtype=FLAGS.dtype)
  if not isinstance(run.model, WorldModel):
    raise InputError(f'{run.workdir} step {run.step} holds a {type(run.model).__name__} '
                     f'(experiment {run.config.experiment}); predictions need a CWM world '
                     'model (task cwm, e.g. cwm_tiny)')
  return run


def frames(run):
  """The two frames of --video or --frames, at the model's frame size."""
  layout = run.model.layout
  if FLAGS.frames:
    return predict.image_frames(FLAGS.frames.split(','), layout)
  gap_ms = run.config.data.gap_ms if FLAGS.gap_ms is None else FLAGS.gap_ms
  return predict.video_frames(FLAGS.video, layout, gap_ms=gap_ms, start_s=FLAGS.start_s)


def main(argv):
  errors.quiet_logs(FLAGS.traceback)
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; run with --help for the options')
  if not FLAGS.workdir:
    fail('--workdir is required: the folder of a CWM run (launch/run.py --workdir)')
  if bool(FLAGS.video) == bool(FLAGS.frames):
    fail('give one of --video=FILE or --frames=A,B')
  if not FLAGS.out:
    fail('--out is required: the folder for prediction.npz and panel.png')
  with errors.funnel(FLAGS.traceback):
    move = predict.parse_move(FLAGS.move) if FLAGS.move else None
    points = predict.parse_points(FLAGS.points) if FLAGS.points else None
    run = load()
    with run.axis_rules():   # activations and the KV cache laid out like the params
      result = predict.predict(
          run.model, frames(run), reveal=FLAGS.reveal, move_2x2=move, points_Kx2=points,
          sequential=FLAGS.sequential, decode=FLAGS.decode, temperature=FLAGS.temperature,
          top_k=FLAGS.top_k, top_p=FLAGS.top_p, orders=FLAGS.orders, seed=FLAGS.seed)
    for path in predict.write(result, FLAGS.out):
      print(f'wrote {path}', flush=True)


if __name__ == '__main__':
  usage.answer_help(sys.argv, __doc__, flag_owner='workdir')
  app.run(main)
