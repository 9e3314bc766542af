"""Neural recording sessions in a tensorstore zarr3 store, and the Grain window pipeline.

store.py (the format and its reader), write.py (validating writer; alignment to the
neural clock), windows.py (training windows and their pipeline). Their public names are
also this package's: `neural.Store`, `neural.write_session`, `neural.pipeline`.
"""

from brainscale.data.behavior import CHANNELS
from brainscale.data.neural.store import (
  CATALOG,
  MAKE_COMMAND,
  STD_FLOOR,
  TIERS,
  TRIAL_KEYS,
  VERSION,
  Session,
  Store,
  read_catalog,
)
from brainscale.data.neural.windows import WindowIndex, example, pipeline, tier_counts, windows
from brainscale.data.neural.write import align_behavior, check_fits, nearest_frame, write_session

__all__ = ['CATALOG', 'CHANNELS', 'MAKE_COMMAND', 'STD_FLOOR', 'TIERS', 'TRIAL_KEYS', 'VERSION',
           'Session', 'Store', 'WindowIndex', 'align_behavior', 'check_fits', 'example',
           'nearest_frame', 'pipeline', 'read_catalog', 'tier_counts', 'windows', 'write_session']
