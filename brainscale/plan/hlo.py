"""What a compiled step does, from XLA's optimized HLO text: kernels, FLOPs, bytes, collectives.

`analyze(text, layout)` walks the per-device program from its entry, counting
how many times a step runs each kernel (a while loop's body by its known trip
count; conditional branches as equally likely), and gives for each kernel its
kind, FLOPs and HBM bytes, and for each collective its payload, the mesh axes
its device groups span and whether they cross nodes. From these come a
roofline time per kernel (`Kernel.seconds`) and the time of the collectives at
given link bandwidths: a speed *estimate* that a real GPU confirms or refutes.

FLOPs: cuBLAS gemms and dots inside fusions (2 x output x contracted size),
convolutions, cuDNN flash attention (forward 2 matmuls, backward 5, over the
visible query-key pairs) and Pallas kernels (the cost estimate each pallas_call
records in its metadata). Elementwise work counts as bytes only. Bytes: operands
plus results, where a fusion that only slices an operand reads the slice and a
dynamic-update-slice into a parameter writes only the update (in place).
"""

import collections
import dataclasses
import json
import math
import re

from brainscale.plan.collectives import Collective, Layout, first_group, span

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                'c128': 16, 'token': 0}
_SHAPE = re.compile(r'([a-z][a-z0-9]*)\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_OPERAND = re.compile(r'%([\w.\-]+)')

FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all',
        'partition-id', 'replica-id', 'opt-barrier', 'add-dependency', 'async-update',
        'async-done', 'domain'}
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute',
               'collective-broadcast', 'ragged-all-to-all')
KINDS = ('matmul', 'attention', 'pallas kernel', 'fusion (elementwise, reductions)', 'copy',
         'collective', 'control', 'other')


def dtype_bytes(dtype: str) -> float:
  if dtype.startswith('f8'):
    return 1
  return _DTYPE_BYTES.get(dtype, 4)


@dataclasses.dataclass
class Instruction:
  name: str
  op: str
  shapes: list            # [(dtype, dims)] of the result (a tuple's elements in order)
  operands: list          # names
  attrs: str              # everything after the operand list
  line: str

  @property
  def result_bytes(self) -> float:
    return sum(dtype_bytes(d) * math.prod(s) for d, s in self.shapes)

  def attr(self, name: str) -> str | None:
    m = re.search(rf'\b{name}=%?([\w.\-]+)', self.attrs)
    return m.group(1) if m else None


def _shapes(text: str) -> list:
  return [(d, tuple(int(x) for x in dims.split(',') if x)) for d, dims in _SHAPE.findall(text)]


def _split_operands(rest: str) -> tuple[str, str]:
  """'a, b), attrs' -> ('a, b', 'attrs'): the operand list up to its closing parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    if ch == '(':
      depth += 1
    elif ch == ')':
      depth -= 1
      if depth == 0:
        return rest[:i], rest[i + 1:]
  return rest, ''


@dataclasses.dataclass
class Module:
  computations: dict      # name -> [Instruction]
  entry: str

  def symbols(self, computation: str) -> dict:
    return {i.name: i for i in self.computations[computation]}


def parse(text: str) -> Module:
  """The computations of an HLO module's text, each a list of instructions."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if not line or line.startswith('HloModule'):
      continue
    if not line[0].isspace():
      header = _HEADER.match(line)
      if header:
        current = computations.setdefault(header.group(2), [])
        if header.group(1):
          entry = header.group(2)
      elif line.startswith('}'):
        current = None
      continue
    m = _INSTRUCTION.match(line) if current is not None else None
    if m:
      operands, attrs = _split_operands(m.group(4))
      current.append(Instruction(m.group(1), m.group(3), _shapes(m.group(2)),
                                 _OPERAND.findall(operands), attrs, line))
  if entry is None:
    raise ValueError('no ENTRY computation in this HLO text')
  return Module(computations, entry)


# ----------------------------------------------------------------------------- kinds

def kind(ins: Instruction, module: Module) -> str:
  """The kind of work an instruction is (KINDS)."""
  op, text = ins.op, ins.line.lower()
  if op.removesuffix('-start') in COLLECTIVES:
    return 'collective'
  if op == 'custom-call':
    target = re.search(r'custom_call_target="([^"]*)"', ins.line)
    target = target.group(1).lower() if target else ''
    if 'fmha' in target or 'flash' in target or 'attention' in target:
      return 'attention'
    if 'triton' in target or 'pallas' in target or 'mosaic' in target:
      return 'pallas kernel'
    if 'gemm' in target or 'matmul' in target or 'cublas' in target or 'conv' in target:
      return 'matmul'
    return 'other'
  if op in ('dot', 'convolution'):
    return 'matmul'
  if op == 'fusion':
    body = module.computations.get(ins.attr('calls'), [])
    if 'gemm' in text or any(i.op in ('dot', 'convolution') for i in body):
      return 'matmul'
    return 'fusion (elementwise, reductions)'
  if op in ('copy', 'transpose', 'copy-start', 'copy-done', 'dynamic-update-slice',
            'dynamic-slice', 'slice', 'concatenate', 'pad'):
    return 'copy'
  if op in ('while', 'conditional', 'call', 'async-start'):
    return 'control'   # its time is its body's ops, counted themselves
  return 'other'


def op_kinds(text: str) -> dict[str, str]:
  """Instruction name -> kind, for every instruction of every computation."""
  module = parse(text)
  return {i.name: kind(i, module) for body in module.computations.values() for i in body}


# ----------------------------------------------------------------------------- FLOPs and bytes

def _dims(attrs: str, key: str) -> list[int]:
  m = re.search(rf'{key}=\{{([\d,]*)\}}', attrs) or re.search(rf'"{key}":\[([^\]]*)\]', attrs)
  return [int(x.strip('" ')) for x in m.group(1).split(',') if x.strip('" ')] if m else []


def _dot_flops(out_shape, lhs_shape, contracting) -> float:
  return 2.0 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in contracting)


def _conv_flops(ins: Instruction, symbols: dict) -> float:
  """2 x output x window x input features per group (forward convolutions)."""
  labels = re.search(r'dim_labels=([\w?]+)_([\w?]+)->([\w?]+)', ins.attrs)
  window = re.search(r'window=\{size=([\dx]+)', ins.attrs)
  groups = re.search(r'feature_group_count=(\d+)', ins.attrs)
  lhs = symbols.get(ins.operands[0]) if ins.operands else None
  if not (labels and lhs and lhs.shapes):
    return 0.0
  features = lhs.shapes[0][1][labels.group(1).index('f')]
  size = math.prod(int(x) for x in window.group(1).split('x')) if window else 1
  per_group = features / (int(groups.group(1)) if groups else 1)
  return 2.0 * math.prod(ins.shapes[0][1]) * size * per_group


def attention_pairs(t: int, s: int, causal: bool, window: int | None = None) -> float:
  """Query-key pairs a fused attention kernel computes: all, the causal half, or a band."""
  pairs = t * s * (0.5 if causal else 1.0)
  if window:
    pairs = min(pairs, t * float(window))
  return pairs


def _cudnn_flops(ins: Instruction, symbols: dict) -> float:
  """cuDNN flash attention: forward QK^T and PV; backward recomputes QK^T, then dV, dP, dQ, dK."""
  q, k = (symbols[n].shapes[0][1] for n in ins.operands[:2])
  b, t, n, h = q
  s = k[1]
  window = re.search(r'"sliding_window_length":\s*"?(\d+)', ins.attrs)
  pairs = attention_pairs(t, s, 'CAUSAL' in ins.attrs, int(window.group(1)) if window else None)
  target = re.search(r'custom_call_target="([^"]*)"', ins.line).group(1)
  matmuls = 5 if 'backward' in target.lower() else 2
  return 2.0 * matmuls * b * n * pairs * h


def _pallas_flops(ins: Instruction) -> float:
  """The cost estimate a pallas_call carries in its metadata (kernels/flash_attention.py)."""
  m = re.search(r'serialized_metadata\s*=\s*"((?:[^"\\]|\\.)*)"', ins.attrs)
  if not m:
    return 0.0
  text = re.sub(r'\\([0-9A-Fa-f]{2})', lambda h: chr(int(h.group(1), 16)),   # MLIR's \22
                m.group(1).replace('\\"', '"'))
  try:
    return float(json.loads(text).get('flops', 0))
  except (ValueError, AttributeError):
    return 0.0


def flops(ins: Instruction, module: Module, symbols: dict) -> float:
  """Matmul FLOPs of one run of an instruction."""
  if ins.op == 'custom-call':
    k = kind(ins, module)
    target = re.search(r'custom_call_target="([^"]*)"', ins.line).group(1)
    if k == 'attention':
      return _cudnn_flops(ins, symbols)
    if k == 'pallas kernel':
      return _pallas_flops(ins)
    if 'conv' in target:
      return _conv_flops(ins, symbols)
    if k == 'matmul':
      lhs = symbols[ins.operands[0]].shapes[0][1]
      return _dot_flops(ins.shapes[0][1], lhs, _dims(ins.attrs, 'lhs_contracting_dimensions'))
    return 0.0
  if ins.op == 'dot':
    lhs = symbols[ins.operands[0]].shapes[0][1]
    return _dot_flops(ins.shapes[0][1], lhs, _dims(ins.attrs, 'lhs_contracting_dims'))
  if ins.op == 'convolution':
    return _conv_flops(ins, symbols)
  if ins.op == 'fusion':
    body = ins.attr('calls')
    inner = module.symbols(body)
    return sum(flops(i, module, inner) for i in module.computations[body]
               if i.op in ('dot', 'convolution', 'fusion'))
  return 0.0


def _through_bitcasts(name: str, symbols: dict) -> Instruction:
  ins = symbols[name]
  while ins.op == 'bitcast' and ins.operands:
    ins = symbols[ins.operands[0]]
  return ins


def _fusion_bytes(ins: Instruction, module: Module, symbols: dict) -> float:
  body = module.computations[ins.attr('calls')]
  inner = {i.name: i for i in body}
  params = {int(re.search(r'parameter\((\d+)\)', i.line).group(1)): i
            for i in body if i.op == 'parameter'}
  users = collections.defaultdict(list)
  for i in body:
    for o in i.operands:
      users[o].append(i)
  root = next((i for i in body if i.line.lstrip().startswith('ROOT')), body[-1])
  roots = [inner[o] for o in root.operands] if root.op == 'tuple' else [root]
  in_place, written = set(), 0.0
  for r in roots:
    r = _through_bitcasts(r.name, inner)
    if r.op == 'dynamic-update-slice':
      buffer = _through_bitcasts(r.operands[0], inner)
      if buffer.op == 'parameter':
        in_place.add(buffer.name)
      written += inner[r.operands[1]].result_bytes
    else:
      written += r.result_bytes

  def readers(name):
    """(user, the name it reads) of `name`, looking through bitcasts."""
    out = []
    for u in users[name]:
      out += readers(u.name) if u.op == 'bitcast' else [(u, name)]
    return out

  read = 0.0
  for index, operand in enumerate(ins.operands):
    p = params.get(index)
    if p is None or p.name in in_place:
      continue
    used = readers(p.name)
    if used and all(u.op in ('dynamic-slice', 'slice') and u.operands[0] == name
                    for u, name in used):
      read += sum(u.result_bytes for u, _ in used)
    else:
      read += symbols[operand].result_bytes if operand in symbols else p.result_bytes
  return read + written


def hbm_bytes(ins: Instruction, module: Module, symbols: dict) -> float:
  """Bytes one run of an instruction reads and writes (workspace buffers excluded)."""
  if ins.op == 'fusion':
    return _fusion_bytes(ins, module, symbols)
  out = ins.shapes
  if ins.op == 'custom-call':
    out = [(d, s) for d, s in out if d not in ('u8', 's8')]   # cuBLAS / cuDNN workspace
  written = sum(dtype_bytes(d) * math.prod(s) for d, s in out)
  return written + sum(symbols[o].result_bytes for o in ins.operands if o in symbols)


# ----------------------------------------------------------------------------- collectives

def _collective(ins: Instruction, count: float, symbols: dict, layout: Layout | None):
  op = ins.op.removesuffix('-start')
  payload = sum(symbols[o].result_bytes for o in ins.operands if o in symbols)
  devices = layout.size if layout else 1
  if op == 'collective-permute':
    pairs = [(int(a), int(b)) for a, b in re.findall(r'\{(\d+),(\d+)\}',
                                                     ins.attrs.split('source_target_pairs=')[-1])]
    moving = [(a, b) for a, b in pairs if a != b]
    if not moving:
      return None
    spans = [span(list(pair), layout) for pair in moving]
    axes = '+'.join(sorted({a for s, _ in spans for a in s.split('+')}))
    return Collective(ins.name, op, count, payload, 2, max(n for _, n in spans), axes)
  group = first_group(ins.attrs, devices) or list(range(devices))
  axes, nodes = span(group, layout)
  return Collective(ins.name, op, count, payload, len(group), nodes, axes)


# ----------------------------------------------------------------------------- the walk

@dataclasses.dataclass
class Kernel:
  name: str
  kind: str
  count: float            # runs per step
  flops: float            # per run
  bytes: float            # per run
  dtype: str              # of the first operand (picks the matmul peak)

  def seconds(self, gpu) -> float:
    """Roofline time of one run: FLOPs at the matmul peak or bytes at HBM bandwidth."""
    return max(self.flops / gpu.peak_flops(self.dtype), self.bytes / gpu.hbm_bandwidth)


@dataclasses.dataclass
class Analysis:
  kernels: list
  collectives: list
  warnings: list          # e.g. a loop whose trip count could not be read (counted once)

  def flops(self) -> float:
    """Per-device FLOPs of one step, as compiled."""
    return sum(k.flops * k.count for k in self.kernels)

  def compute_seconds(self, gpu) -> float:
    """Roofline lower bound on one step's kernel time."""
    return sum(k.seconds(gpu) * k.count for k in self.kernels)

  def by_kind(self, gpu) -> dict:
    """kind -> {launches, flops, bytes, seconds} per step."""
    out = {}
    for k in self.kernels:
      row = out.setdefault(k.kind, dict(launches=0.0, flops=0.0, bytes=0.0, seconds=0.0))
      row['launches'] += k.count
      row['flops'] += k.flops * k.count
      row['bytes'] += k.bytes * k.count
      row['seconds'] += k.seconds(gpu) * k.count
    return out

  def collective_bytes(self) -> dict:
    """(op, axes, 'NVLink' | 'InfiniBand') -> bytes each device sends per step."""
    out = collections.Counter()
    for c in self.collectives:
      nvlink, infiniband = c.link_bytes()
      for link, b in (('NVLink', nvlink), ('InfiniBand', infiniband)):
        if b:
          out[(c.op, c.axes, link)] += b * c.count
    return dict(out)

  def collective_seconds(self, nvlink: float, infiniband: float) -> float:
    """Time of every collective back to back at these per-GPU bandwidths (bytes/s); within
    one collective the two links work at once, the slower one setting its time."""
    total = 0.0
    for c in self.collectives:
      on_nvlink, on_infiniband = c.link_bytes()
      total += c.count * max(on_nvlink / nvlink, on_infiniband / infiniband)
    return total


def _constant(name: str, symbols: dict) -> int | None:
  ins = symbols.get(name)
  while ins is not None and ins.op in ('bitcast', 'copy', 'convert') and ins.operands:
    ins = symbols.get(ins.operands[0])
  m = re.search(r'constant\((-?\d+)\)', ins.line) if ins is not None else None
  return int(m.group(1)) if m else None


def trip_count(ins: Instruction, module: Module, symbols: dict) -> int | None:
  """Iterations of a while loop: XLA's known_trip_count, or read off a counted loop
  (induction variable from a constant, compared with a constant); None if neither."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
  if m:
    return int(m.group(1))
  index = re.search(r'"known_induction_variable":\{"tuple_index":"(\d+)"', ins.attrs)
  init_tuple = symbols.get(ins.operands[0]) if ins.operands else None
  if not index or init_tuple is None or init_tuple.op != 'tuple':
    return None
  start = _constant(init_tuple.operands[int(index.group(1))], symbols)
  step = re.search(r'"known_init_step":\{"init":"-?\d+","step":"(-?\d+)"', ins.attrs)
  step = int(step.group(1)) if step else 1
  condition = ins.attr('condition')
  bodies = [condition] + [i.attr('calls') for i in module.computations[condition]
                          if i.op == 'fusion']
  for body in bodies:
    inner = module.symbols(body)
    for c in module.computations[body]:
      if c.op != 'compare' or len(c.operands) != 2:
        continue
      direction = re.search(r'direction=(\w+)', c.attrs).group(1)
      limit = _constant(c.operands[1], inner)
      if limit is None:
        limit = _constant(c.operands[0], inner)
        direction = {'LT': 'GT', 'LE': 'GE', 'GT': 'LT', 'GE': 'LE'}.get(direction, direction)
      if limit is None or start is None or step == 0:
        return None
      span = {'LT': limit - start, 'LE': limit - start + 1, 'GT': start - limit,
              'GE': start - limit + 1}.get(direction)
      return max(0, -(-span // abs(step))) if span is not None else None
  return None


def analyze(text: str, layout: Layout | None = None) -> Analysis:
  """Every kernel and collective of a compiled module's per-device program, per step."""
  module = parse(text)
  kernels, collectives, warnings = [], [], []

  def walk(name: str, count: float):
    symbols = module.symbols(name)
    for ins in module.computations[name]:
      op = ins.op
      if op in FREE or op.endswith('-done'):
        continue
      if op == 'while':
        trips = trip_count(ins, module, symbols)
        if trips is None:
          warnings.append(f'{ins.name}: trip count unknown, its body is counted once')
        walk(ins.attr('body'), count * (1 if trips is None else trips))
      elif op == 'conditional':
        branches = re.findall(r'%([\w.\-]+)', ins.attrs.split('branch_computations=')[-1]
                              .split('}')[0]) or [ins.attr('true_computation'),
                                                  ins.attr('false_computation')]
        for branch in branches:
          walk(branch, count / len(branches))
      elif op in ('call', 'async-start'):
        walk(ins.attr('to_apply') or ins.attr('calls'), count)
      elif op.removesuffix('-start') in COLLECTIVES:
        c = _collective(ins, count, symbols, layout)
        if c is not None:
          collectives.append(c)
      else:
        first = symbols.get(ins.operands[0]) if ins.operands else None
        dtype = first.shapes[0][0] if first is not None and first.shapes else 'f32'
        kernels.append(Kernel(ins.name, kind(ins, module), count, flops(ins, module, symbols),
                              hbm_bytes(ins, module, symbols), dtype))

  walk(module.entry, 1.0)
  return Analysis(kernels, collectives, warnings)
