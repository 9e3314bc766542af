"""Collectives of a compiled step: which mesh axes and nodes a device group spans, and
the bytes each device sends over NVLink and InfiniBand (hlo.py finds them in the HLO).

`Layout` says how XLA's partition ids map onto the mesh; `first_group` reads a
collective's replica groups in any of the formats XLA prints.
"""

import dataclasses
import math
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
  """How partition ids map onto the mesh: axis names, mesh shape, each partition's node."""
  axes: tuple
  shape: tuple
  node_of: tuple          # node index of partition p (mesh.devices.flat order)

  @classmethod
  def of_mesh(cls, mesh) -> 'Layout':
    return cls(tuple(mesh.axis_names), tuple(mesh.devices.shape),
               tuple(int(d.process_index) for d in mesh.devices.flat))

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(dims)).reshape(dims)
  return (ids.transpose(perm) if perm else ids).reshape(-1)


def _ints(text: str | None) -> list[int]:
  return [int(x) for x in text.split(',') if x] if text else []


def first_group(attrs: str, devices: int) -> list[int] | None:
  """The first device group of a collective's replica_groups, in any of XLA's formats
  (explicit lists, iota `[G,S]<=[dims]T(perm)`, or mesh axes `mesh[...] {axes}`)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]"
                r"(?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}", attrs)
  if m:
    names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    sizes = [int(n) for _, n in names]
    ids = (_iota(_ints(m.group(2)), _ints(m.group(3))) if m.group(2)
           else np.arange(math.prod(sizes))).reshape(sizes)
    chosen = [i for i, (a, _) in enumerate(names) if f"'{a}'" in m.group(4)]
    rest = [i for i in range(len(sizes)) if i not in chosen]
    return ids.transpose(rest + chosen).reshape(-1, math.prod(sizes[i] for i in chosen))[0].tolist()
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', attrs)
  if m:
    ids = _iota(_ints(m.group(3)), _ints(m.group(4)))
    return ids.reshape(int(m.group(1)), int(m.group(2)))[0].tolist()
  m = re.search(r'replica_groups=\{(\{[\d,]*\})?', attrs)
  if m:
    return _ints(m.group(1)[1:-1]) if m.group(1) else list(range(devices))
  return None


@dataclasses.dataclass
class Collective:
  name: str
  op: str                 # all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute
  count: float            # runs per step
  payload: float          # operand bytes per device
  group: int              # devices per group
  nodes: int              # nodes the group spans
  axes: str               # mesh axes the group spans ('data+fsdp'), '?' when unknown

  def link_bytes(self) -> tuple[float, float]:
    """(NVLink, InfiniBand) bytes each device sends per run.

    A group of n devices on m nodes, k = n / m per node, moving S bytes in all (the
    gathered or reduced array): each device sends S (k - 1) / k within its node and,
    with one NIC per GPU sharing the cross-node part, S (m - 1) / (m k) across nodes
    (a ring when k = 1); all-reduce twice that; all-to-all sends each peer its share.
    """
    n, m = self.group, max(self.nodes, 1)
    k = n / m
    if n <= 1:
      return 0.0, 0.0
    if self.op == 'collective-permute':
      return (0.0, self.payload) if m > 1 else (self.payload, 0.0)
    if self.op in ('all-to-all', 'ragged-all-to-all'):
      return self.payload * (k - 1) / n, self.payload * (n - k) / n
    total = self.payload * n if self.op == 'all-gather' else self.payload
    times = 2 if self.op == 'all-reduce' else 1
    return times * total * (k - 1) / k, times * total * (m - 1) / (m * k)


def span(group: list[int], layout: Layout | None) -> tuple[str, int]:
  """The mesh axes a device group spans, and how many nodes it touches."""
  if layout is None or not group or max(group) >= layout.size:
    return '?', 1
  coords = np.array(np.unravel_index(group, layout.shape))
  axes = [a for a, c in zip(layout.axes, coords) if len(set(c)) > 1]
  return '+'.join(axes) or '-', len({layout.node_of[p] for p in group})
