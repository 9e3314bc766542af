"""Video import as a SLURM job array: throughput per task and the merge's time, beside the
one-machine import of the same clips.

  eval "$(launch/local_slurm/start.sh /tmp/slurm)"
  python benchmarks/import_array.py --clips=200 --parts=4 --workdir=/tmp/import_bench

Writes `clips` short clips with the ffmpeg CLI (testsrc2, 320x240, 25 fps, 2 s), imports
them on one machine (--workers=2), then as an array of `parts` one-CPU tasks plus the
merge on the SLURM cluster of $SLURM_CONF, and prints a markdown table of the figures.
"""

import argparse
import pathlib
import re
import shutil
import subprocess
import time

from brainscale.data.importers import videos
from launch import import_array

SETTINGS = ['--clip_seconds=1', '--max_side=160']


def write_clips(source: pathlib.Path, count: int):
  source.mkdir(parents=True, exist_ok=True)
  for k in range(count):
    path = source / f'{k % 10}' / f'clip-{k:04d}.mp4'
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
      subprocess.run(['ffmpeg', '-v', 'error', '-y', '-f', 'lavfi', '-i',
                      f'testsrc2=size=320x240:rate=25:duration=2,hue=h={k}', '-c:v', 'libx264',
                      '-preset', 'ultrafast', '-pix_fmt', 'yuv420p', str(path)], check=True)


def ended(job: int) -> str | None:
  shown = subprocess.run(['scontrol', 'show', 'job', str(job)], capture_output=True,
                         text=True).stdout
  state = re.search(r'JobState=(\w+)', shown)
  return state.group(1) if state and state.group(1) not in ('PENDING', 'RUNNING') else None


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--clips', type=int, default=200)
  parser.add_argument('--parts', type=int, default=4)
  parser.add_argument('--workdir', default='/tmp/import_bench')
  flags = parser.parse_args()
  work = pathlib.Path(flags.workdir)
  source = work / 'src'
  start = time.monotonic()
  write_clips(source, flags.clips)
  print(f'wrote {flags.clips} clips in {time.monotonic() - start:.0f} s')
  for out in (work / 'one', work / 'array'):
    shutil.rmtree(out, ignore_errors=True)

  start = time.monotonic()
  videos.main([str(source), str(work / 'one'), '--workers=2', '--quiet', *SETTINGS])
  one_machine = time.monotonic() - start

  args = videos.parser().parse_args([str(source), str(work / 'array'), *SETTINGS])
  resources = {'partition': '', 'account': '', 'qos': '', 'time': '01:00:00', 'cpus_per_task': 1}
  start = time.monotonic()
  array_job, merge_job = import_array.submit('videos', args, parts=flags.parts,
                                             resources=resources)
  while (state := ended(merge_job)) is None:
    time.sleep(0.5)
  array_wall = time.monotonic() - start
  assert state == 'COMPLETED', state

  print('| run | files | files/s | time |\n|---|---|---|---|')
  print(f'| one machine, --workers=2 | {flags.clips} | {flags.clips / one_machine:.1f} | '
        f'{one_machine:.1f} s (in process, a spawn pool of 2) |')
  for i in range(flags.parts):
    log = (work / 'array' / 'logs' / f'import-g0001-{array_job}_{i}.log').read_text()
    done, rate, took = re.search(r'(\d+)/\d+ files, .* ([\d.]+) files/s, took ([\d.]+) s',
                                 log).groups()
    print(f'| array task {i} (1 CPU) | {done} | {rate} | {took} s (import alone) |')
  merged = (work / 'array' / 'logs' / f'merge-{merge_job}.log').read_text()
  merge_s = re.search(r'in ([\d.]+) s:', merged).group(1)
  print(f'| merge job | {flags.clips} | -- | {merge_s} s (merge alone) |')
  print(f'| array of {flags.parts} + merge, submission to merge end | {flags.clips} | '
        f'{flags.clips / array_wall:.1f} | {array_wall:.1f} s |')


if __name__ == '__main__':
  main()
