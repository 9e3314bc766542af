"""`--help` and `-h` of brainscale's command lines: a usage to act on, then the flags.

absl parses the flags; these options are answered before it sees them, on stdout,
with exit status 0 (absl's own `--helpfull` still lists every flag of every library).
"""

import sys

from absl import flags

HELP = ('-h', '--help', '-?', '--helpshort')


def answer_help(argv: list[str], text: str, flag_owner: str):
  """If argv asks for help: prints `text` and the flags that `flag_owner` (a flag's name)
  belongs to, then exits 0."""
  if not any(arg in HELP for arg in argv[1:]):
    return
  module = flags.FLAGS.find_module_defining_flag(flag_owner)
  print(text.strip() + '\n\nflags:\n' + flags.FLAGS.module_help(module) + '\n')
  sys.exit(0)
