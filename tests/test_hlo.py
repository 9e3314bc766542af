"""brainscale.plan.hlo on HLO text as XLA's GPU compiler writes it: kernels, loops, collectives."""

import json

import pytest

from brainscale.plan import collectives, gpu, hlo

H100 = gpu.GPUS['H100-SXM-80GB']

# A step as XLA GPU prints it: a counted loop (no known_trip_count: its bound is read from
# the condition) around a loop with a known trip count, gemms, cuDNN and Pallas kernels, an
# in-place dynamic-update-slice fusion, a slicing fusion, collectives in each group format.
# \22 is MLIR's escape of a double quote.
_META = json.dumps({'flops': '1000000', 'bytes_accessed': '64'}).replace('"', '\\22')
MODULE = f'''HloModule jit_step, entry_computation_layout={{()->()}}

%fused_slice (param_0.1: bf16[12,64,32], param_1.2: s32[]) -> bf16[1,64,32] {{
  %param_0.1 = bf16[12,64,32]{{2,1,0}} parameter(0)
  %param_1.2 = s32[] parameter(1)
  %constant.3 = s32[] constant(0)
  ROOT %dynamic-slice.4 = bf16[1,64,32]{{2,1,0}} dynamic-slice(%param_0.1, %param_1.2, %constant.3, %constant.3), dynamic_slice_sizes={{1,64,32}}
}}

%fused_update (param_0.5: bf16[12,16,32], param_1.6: bf16[16,32], param_2.7: s32[]) -> bf16[12,16,32] {{
  %param_0.5 = bf16[12,16,32]{{2,1,0}} parameter(0)
  %param_1.6 = bf16[16,32]{{1,0}} parameter(1)
  %bitcast.8 = bf16[1,16,32]{{2,1,0}} bitcast(%param_1.6)
  %param_2.7 = s32[] parameter(2)
  %constant.9 = s32[] constant(0)
  ROOT %dynamic-update-slice.10 = bf16[12,16,32]{{2,1,0}} dynamic-update-slice(%param_0.5, %bitcast.8, %param_2.7, %constant.9, %constant.9)
}}

%fused_exp (param_0.11: f32[16,32]) -> f32[16,32] {{
  %param_0.11 = f32[16,32]{{1,0}} parameter(0)
  ROOT %exponential.12 = f32[16,32]{{1,0}} exponential(%param_0.11)
}}

%fused_dot (param_0.13: bf16[16,64], param_1.14: bf16[64,8]) -> bf16[16,8] {{
  %param_0.13 = bf16[16,64]{{1,0}} parameter(0)
  %param_1.14 = bf16[64,8]{{1,0}} parameter(1)
  ROOT %dot.15 = bf16[16,8]{{1,0}} dot(%param_0.13, %param_1.14), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}

%inner_body (p.20: (s32[], bf16[16,64], bf16[12,64,32], bf16[12,16,32])) -> (s32[], bf16[16,64], bf16[12,64,32], bf16[12,16,32]) {{
  %p.20 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) parameter(0)
  %i.21 = s32[] get-tuple-element(%p.20), index=0
  %x.22 = bf16[16,64]{{1,0}} get-tuple-element(%p.20), index=1
  %w.23 = bf16[12,64,32]{{2,1,0}} get-tuple-element(%p.20), index=2
  %acc.24 = bf16[12,16,32]{{2,1,0}} get-tuple-element(%p.20), index=3
  %w_i.25 = bf16[1,64,32]{{2,1,0}} fusion(%w.23, %i.21), kind=kLoop, calls=%fused_slice
  %w_i.26 = bf16[64,32]{{1,0}} bitcast(%w_i.25)
  %gemm.27 = (bf16[16,32]{{1,0}}, s8[4194304]{{0}}) custom-call(%x.22, %w_i.26), custom_call_target="__cublas$lt$matmul", backend_config={{"gemm_backend_config":{{"dot_dimension_numbers":{{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}}}}
  %y.28 = bf16[16,32]{{1,0}} get-tuple-element(%gemm.27), index=0
  %acc.29 = bf16[12,16,32]{{2,1,0}} fusion(%acc.24, %y.28, %i.21), kind=kLoop, calls=%fused_update
  %ag.30 = (bf16[16,64]{{1,0}}, bf16[128,64]{{1,0}}) all-gather-start(%x.22), channel_id=1, replica_groups=[2,8]<=[16], dimensions={{0}}, use_global_device_ids=true
  %ag.31 = bf16[128,64]{{1,0}} all-gather-done(%ag.30)
  %one.32 = s32[] constant(1)
  %next.33 = s32[] add(%i.21, %one.32)
  ROOT %t.34 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) tuple(%next.33, %x.22, %w.23, %acc.29)
}}

%inner_cond (p.40: (s32[], bf16[16,64], bf16[12,64,32], bf16[12,16,32])) -> pred[] {{
  %p.40 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) parameter(0)
  %i.41 = s32[] get-tuple-element(%p.40), index=0
  %n.42 = s32[] constant(12)
  ROOT %lt.43 = pred[] compare(%i.41, %n.42), direction=LT
}}

%outer_body (p.50: (s32[], bf16[16,64], bf16[12,64,32], bf16[12,16,32])) -> (s32[], bf16[16,64], bf16[12,64,32], bf16[12,16,32]) {{
  %p.50 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) parameter(0)
  %j.51 = s32[] get-tuple-element(%p.50), index=0
  %x.52 = bf16[16,64]{{1,0}} get-tuple-element(%p.50), index=1
  %w.53 = bf16[12,64,32]{{2,1,0}} get-tuple-element(%p.50), index=2
  %acc.54 = bf16[12,16,32]{{2,1,0}} get-tuple-element(%p.50), index=3
  %zero.55 = s32[] constant(0)
  %init.56 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) tuple(%zero.55, %x.52, %w.53, %acc.54)
  %loop.57 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) while(%init.56), condition=%inner_cond, body=%inner_body, backend_config={{"known_trip_count":{{"n":"12"}},"known_init_step":{{"init":"0","step":"1"}},"known_induction_variable":{{"tuple_index":"0"}}}}
  %acc.58 = bf16[12,16,32]{{2,1,0}} get-tuple-element(%loop.57), index=3
  %one.59 = s32[] constant(1)
  %next.60 = s32[] add(%j.51, %one.59)
  ROOT %t.61 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) tuple(%next.60, %x.52, %w.53, %acc.58)
}}

%fused_compare (param_0.70: s32[]) -> pred[] {{
  %param_0.70 = s32[] parameter(0)
  %limit.71 = s32[] constant(7)
  ROOT %compare.72 = pred[] compare(%param_0.70, %limit.71), direction=LT
}}

%outer_cond (p.80: (s32[], bf16[16,64], bf16[12,64,32], bf16[12,16,32])) -> pred[] {{
  %p.80 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) parameter(0)
  %j.81 = s32[] get-tuple-element(%p.80), index=0
  ROOT %lt.82 = pred[] fusion(%j.81), kind=kLoop, calls=%fused_compare
}}

ENTRY %main.90 (x.91: bf16[16,64], w.92: bf16[12,64,32], q.93: bf16[2,512,4,64], k.94: bf16[2,512,4,64], e.95: f32[16,32]) -> bf16[12,16,32] {{
  %x.91 = bf16[16,64]{{1,0}} parameter(0)
  %w.92 = bf16[12,64,32]{{2,1,0}} parameter(1)
  %q.93 = bf16[2,512,4,64]{{3,2,1,0}} parameter(2)
  %k.94 = bf16[2,512,4,64]{{3,2,1,0}} parameter(3)
  %e.95 = f32[16,32]{{1,0}} parameter(4)
  %zeros.96 = bf16[12,16,32]{{2,1,0}} constant(0)
  %one.97 = s32[] constant(1)
  %init.98 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) tuple(%one.97, %x.91, %w.92, %zeros.96)
  %loop.99 = (s32[], bf16[16,64]{{1,0}}, bf16[12,64,32]{{2,1,0}}, bf16[12,16,32]{{2,1,0}}) while(%init.98), condition=%outer_cond, body=%outer_body, backend_config={{"known_induction_variable":{{"tuple_index":"0"}},"dynamic_variables":[]}}
  %fwd.100 = (bf16[2,4,512,64]{{3,1,2,0}}, f32[2,4,512]{{2,1,0}}, u8[0]{{0}}) custom-call(%q.93, %k.94, %k.94), custom_call_target="__cudnn$fmhaSoftmax", backend_config={{"cudnn_fmha_backend_config": {{"mask_type": "CAUSAL"}}}}
  %bwd.101 = (bf16[2,4,512,64]{{3,1,2,0}}, bf16[2,4,512,64]{{3,1,2,0}}, bf16[2,4,512,64]{{3,1,2,0}}, u8[0]{{0}}) custom-call(%q.93, %k.94, %k.94, %q.93), custom_call_target="__cudnn$fmhaSoftmaxBackward", backend_config={{"cudnn_fmha_backend_config": {{"mask_type": "NO_MASK"}}}}
  %pallas.102 = bf16[2,512,4,64]{{3,2,1,0}} custom-call(%q.93, %k.94), custom_call_target="__gpu$xla.gpu.triton", backend_config={{name = "flash_attention_fwd", serialized_metadata = "{_META}", grid_x = 4 : i32}}
  %exp.103 = f32[16,32]{{1,0}} fusion(%e.95), kind=kLoop, calls=%fused_exp
  %gemm.104 = bf16[16,8]{{1,0}} fusion(%x.91, %x.91), kind=kCustom, calls=%fused_dot
  %rs.105 = bf16[8,32]{{1,0}} reduce-scatter(%exp.103), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=8] {{'axis_0'}}, dimensions={{0}}, to_apply=%fused_exp
  %ar.106 = f32[16,32]{{1,0}} all-reduce-start(%e.95), channel_id=3, replica_groups={{{{0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}}}}, to_apply=%fused_exp
  %ar.107 = f32[16,32]{{1,0}} all-reduce-done(%ar.106)
  %cp.108 = (bf16[16,64]{{1,0}}, bf16[16,64]{{1,0}}) collective-permute-start(%x.91), channel_id=4, source_target_pairs={{{{0,0}},{{1,1}}}}
  ROOT %out.109 = bf16[12,16,32]{{2,1,0}} get-tuple-element(%loop.99), index=3
}}
'''

# The module's devices: a (node 2) x (gpu 8) mesh, axes named as brainscale's, one node per row.
LAYOUT = collectives.Layout(('fsdp', 'tensor'), (2, 8), tuple(p // 8 for p in range(16)))


def test_loops_multiply_their_bodies_by_the_trip_count_known_or_read_off_the_condition():
  module = hlo.parse(MODULE)
  entry = module.symbols(module.entry)
  outer = entry['loop.99']
  assert hlo.trip_count(outer, module, entry) == 6            # j = 1 .. 6 < 7
  inner = module.symbols('outer_body')['loop.57']
  assert hlo.trip_count(inner, module, module.symbols('outer_body')) == 12
  a = hlo.analyze(MODULE, LAYOUT)
  counts = {k.name: k.count for k in a.kernels}
  assert counts['gemm.27'] == counts['w_i.25'] == counts['acc.29'] == 72
  assert counts['fwd.100'] == counts['exp.103'] == 1
  assert not a.warnings


def test_flops_of_gemms_fused_dots_cudnn_attention_and_pallas_metadata():
  a = hlo.analyze(MODULE, LAYOUT)
  by_name = {k.name: k for k in a.kernels}
  assert by_name['gemm.27'].flops == 2 * 16 * 32 * 64
  assert by_name['gemm.104'].flops == 2 * 16 * 8 * 64
  assert by_name['gemm.27'].kind == by_name['gemm.104'].kind == 'matmul'
  b, t, n, h = 2, 512, 4, 64
  assert by_name['fwd.100'].flops == 2 * 2 * b * n * (t * t / 2) * h    # causal half, 2 matmuls
  assert by_name['bwd.101'].flops == 2 * 5 * b * n * t * t * h          # no mask, 5 matmuls
  assert by_name['fwd.100'].kind == 'attention'
  assert by_name['pallas.102'].flops == 1e6 and by_name['pallas.102'].kind == 'pallas kernel'
  assert by_name['exp.103'].flops == 0 and by_name['exp.103'].kind.startswith('fusion')
  total = 72 * 2 * 16 * 32 * 64 + 2 * 16 * 8 * 64 + 2 * b * n * t * t * h + 10 * b * n * t * t * h
  assert a.flops() == pytest.approx(total + 1e6)


def test_bytes_count_slices_read_and_updates_written_in_place():
  by_name = {k.name: k for k in hlo.analyze(MODULE, LAYOUT).kernels}
  # reads one [1, 64, 32] slice of the [12, 64, 32] stack (and its index), writes it
  assert by_name['w_i.25'].bytes == 2 * (64 * 32 * 2) + 4
  # writes one [16, 32] row into the [12, 16, 32] accumulator in place: update read + written
  assert by_name['acc.29'].bytes == 2 * (16 * 32 * 2) + 4
  # the gemm reads x and w_i and writes y; the s8 workspace is not HBM traffic
  assert by_name['gemm.27'].bytes == (16 * 64 + 64 * 32 + 16 * 32) * 2
  assert by_name['exp.103'].bytes == 2 * 16 * 32 * 4
  k = by_name['exp.103']
  assert k.seconds(H100) == pytest.approx(k.bytes / H100.hbm_bandwidth)
  big = hlo.Kernel('g', 'matmul', 1, flops=1e12, bytes=1e6, dtype='bf16')
  assert big.seconds(H100) == pytest.approx(1e12 / H100.bf16_flops)
  assert hlo.Kernel('g', 'matmul', 1, 1e12, 1e6, 'f32').seconds(H100) == pytest.approx(
      1e12 / H100.tf32_flops)


def test_collectives_name_their_mesh_axes_and_links_in_every_group_format():
  a = hlo.analyze(MODULE, LAYOUT)
  by_name = {c.name: c for c in a.collectives}
  assert 'cp.108' not in by_name                        # every pair sends to itself
  gather = by_name['ag.30']                             # iota [2,8]<=[16]: a node's 8 GPUs
  assert (gather.axes, gather.group, gather.nodes, gather.count) == ('tensor', 8, 1, 72)
  assert gather.link_bytes() == (16 * 64 * 2 * 7, 0.0)  # each receives 7 shards over NVLink
  scatter = by_name['rs.105']                           # mesh axes form: across the 2 nodes
  assert (scatter.axes, scatter.group, scatter.nodes) == ('fsdp', 2, 2)
  assert scatter.link_bytes() == (0.0, 16 * 32 * 4 / 2)
  reduce = by_name['ar.106']                            # explicit list: all 16, both nodes
  assert (reduce.axes, reduce.group, reduce.nodes) == ('fsdp+tensor', 16, 2)
  s = 16 * 32 * 4
  assert reduce.link_bytes() == pytest.approx((2 * s * 7 / 8, 2 * s * 1 / (2 * 8)))
  table = a.collective_bytes()
  assert table[('all-gather', 'tensor', 'NVLink')] == 72 * 16 * 64 * 2 * 7
  assert ('all-gather', 'tensor', 'InfiniBand') not in table
  seconds = a.collective_seconds(nvlink=450e9, infiniband=50e9)
  expected = (72 * 16 * 64 * 2 * 7 / 450e9 + (s / 2) / 50e9
              + max(2 * s * 7 / 8 / 450e9, 2 * s / 16 / 50e9))
  assert seconds == pytest.approx(expected)


@pytest.mark.parametrize('text,group', [
    ("replica_groups=[4,2]<=[2,2,2]T(1,0,2)", [0, 1]),
    ("replica_groups=[2,4]<=[4,2]T(1,0)", [0, 2, 4, 6]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", [0, 4]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}",
     [0, 1]),
    ("replica_groups={{3,7},{0,4}}", [3, 7]),
    ("replica_groups={}", list(range(8))),
])
def test_replica_group_formats(text, group):
  assert collectives.first_group(text + ', dimensions={0}', 8) == group


def test_op_kinds_and_a_module_without_entry():
  kinds = hlo.op_kinds(MODULE)
  assert kinds['loop.99'] == 'control' and kinds['ag.30'] == 'collective'
  assert kinds['pallas.102'] == 'pallas kernel' and kinds['dot.15'] == 'matmul'
  with pytest.raises(ValueError, match='ENTRY'):
    hlo.parse('HloModule m\n\n%f (a: f32[]) -> f32[] {\n  ROOT %a = f32[] parameter(0)\n}\n')


def test_op_kinds_read_modules_with_typed_operands():
  text = '''HloModule jit_step

%fused_dot (p0: bf16[8,16], p1: bf16[16,4]) -> bf16[8,4] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,4]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,4]{1,0} dot(bf16[8,16]{1,0} %p0, bf16[16,4]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_exp (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %exponential.2 = f32[8]{0} exponential(f32[8]{0} %p0)
}

ENTRY %main.9 (a: bf16[8,16], b: bf16[16,4], x: f32[8]) -> (bf16[8,4], f32[8]) {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,4]{1,0} parameter(1)
  %x = f32[8]{0} parameter(2)
  %gemm_fusion.3 = bf16[8,4]{1,0} fusion(bf16[8,16]{1,0} %a, bf16[16,4]{1,0} %b), kind=kCustom, calls=%fused_dot
  %loop_exp_fusion = f32[8]{0} fusion(f32[8]{0} %x), kind=kLoop, calls=%fused_exp
  %custom-call.4 = (bf16[8,4]{1,0}, u8[0]{0}) custom-call(bf16[8,16]{1,0} %a), custom_call_target="__cudnn$fmhaSoftmax"
  %custom-call.5 = bf16[8,4]{1,0} custom-call(bf16[8,16]{1,0} %a), custom_call_target="__cublas$lt$matmul"
  %all-gather.6 = f32[16]{0} all-gather(f32[8]{0} %x), dimensions={0}
  %while.7 = (f32[8]{0}) while((f32[8]{0}) %t), condition=%cond, body=%body
  ROOT %tuple.8 = (bf16[8,4]{1,0}, f32[8]{0}) tuple(bf16[8,4]{1,0} %gemm_fusion.3, f32[8]{0} %loop_exp_fusion)
}
'''
  kinds = hlo.op_kinds(text)
  assert kinds['gemm_fusion.3'] == 'matmul'
  assert kinds['loop_exp_fusion'] == 'fusion (elementwise, reductions)'
  assert kinds['custom-call.4'] == 'attention'
  assert kinds['custom-call.5'] == 'matmul'
  assert kinds['all-gather.6'] == 'collective'
  assert kinds['while.7'] == 'control'
  assert kinds['dot.1'] == 'matmul'
