"""The sections every experiment shares; experiments override what differs.

Mesh axes are sized as DCN (across nodes) x ICI (within a node); -1 means
"the rest". `mesh.rules` maps each logical axis name of a parameter or an
activation to mesh axes ('' = replicated, 'data,fsdp' = both).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = ''
  c.task = ''
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.attention = 'xla'        # xla | cudnn | pallas
  c.model.remat = 'full'           # a name in nn.REMAT_POLICIES (none, full, save_attention, ...)
  c.model.compute_dtype = 'bfloat16'
  c.model.param_dtype = 'float32'

  c.data = ml_collections.ConfigDict()
  c.data.workers = 0               # Grain worker processes; 0 = in process
  c.data.prefetch = 2              # batches buffered ahead of the step

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32          # global, across all processes
  c.train.microbatches = 1         # gradient accumulation
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.1       # cosine decays to learning_rate * this
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0          # global norm; 0 disables
  c.train.log_every = 10
  c.train.eval_every = 0           # 0: only at the end
  c.train.eval_batches = 4
  c.train.peak_tflops = 989.0      # per device, bf16 dense (H100/H200 SXM); CPU is measured
  c.train.profile_steps = ''       # 'START,COUNT': a jax.profiler trace of those steps in
  c.train.profile_all = False      # WORKDIR/tb (train/profile.py); process 0, or all
  # Parameter groups: name -> (regex on the parameter path, lr scale, weight decay).
  c.train.groups = ml_collections.ConfigDict()

  c.plan = ml_collections.ConfigDict()   # --mode=plan (brainscale/plan/plan.py)
  c.plan.mfu = 0.45                  # step time is quoted at this model-FLOPs utilisation
  c.plan.usd_per_gpu_hour = 0.25
  c.plan.days = 30                   # the campaign costed
  c.plan.hbm_fraction = 0.8          # of the GPU's HBM the compiled step may use
  c.plan.target = 'auto'             # gpu (XLA's GPU compiler) | cpu (simulated devices) |
                                     # auto: gpu when the CUDA plugin is installed
  # The campaign's goodput (brainscale/train/goodput.py:plan_lines), per interruption:
  c.plan.restart_s = 600             # detection, teardown, queue, start-up and compile
  c.plan.restore_s = 300             # reading the newest checkpoint back
  c.plan.save_s = 10                 # training blocked by each (async) checkpoint save

  c.inference = ml_collections.ConfigDict()  # brainscale.inspect.load, export, probe plan
  c.inference.dtype = 'float32'      # the params' dtype once loaded (cast as read)
  c.inference.tensor = 1             # devices per model copy: heads/mlp/vocab split over them;
                                     # the other local devices split the examples (data)
  c.inference.batch = 1              # examples per model copy --mode=probe_plan compiles for

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.report = ml_collections.ConfigDict()   # TensorBoard and metrics.jsonl always; W&B if named
  c.report.wandb_project = ''      # '' = no W&B; wandb is imported only when set
  c.report.wandb_entity = ''       # '' = the W&B default entity
  c.report.wandb_mode = ''         # online | offline | disabled; '' = WANDB_MODE or online
  c.report.wandb_name = ''         # '' = the experiment name

  c.mesh = ml_collections.ConfigDict()
  c.mesh.dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1))
  c.mesh.ici = ml_collections.ConfigDict(dict(data=1, fsdp=-1, sequence=1, tensor=1))
  c.mesh.rules = ml_collections.ConfigDict(dict(
      batch='data,fsdp', length='sequence',
      embed='fsdp', heads='tensor', kv_heads='tensor', mlp='tensor',
      vocab='tensor', layers='', head_dim='', norm='',
      act_embed='', act_length='', act_heads='tensor', act_mlp='tensor', act_vocab='tensor',
  ))
  c.mesh.coordinator = ''          # host:port; '' = SLURM autodetect or single process
  c.mesh.num_processes = 0
  c.mesh.process_id = -1
  c.mesh.init_timeout_s = 1800
  c.mesh.heartbeat_timeout_s = 60  # JAX's coordination service: a silent process is dead after

  # The hang watchdog (brainscale/train/watchdog.py): seconds without progress per phase.
  c.watchdog = ml_collections.ConfigDict()
  c.watchdog.enabled = True
  c.watchdog.restore_s = 1800      # start of the trainer to the restored (or new) state
  c.watchdog.compile_s = 3600      # to the end of the first step (compiles); also steps until
                                   # the step limit is learned
  c.watchdog.step_s = 0            # 0: learned, step_factor x the slowest of the first
  c.watchdog.step_factor = 10.0    # warmup_steps steps after the first, at least min_step_s
  c.watchdog.min_step_s = 120
  c.watchdog.warmup_steps = 20
  c.watchdog.save_s = 1800         # a checkpoint save (the blocking part and waiting for the last)
  c.watchdog.eval_s = 3600         # an evaluation (its first compiles)
  return c


def cluster(*, nodes: int, time_limit: str, gpus_per_node: int = 8, tasks_per_node: int = 0,
            gpu: str = 'H100-SXM-80GB', nvlink_gbps: float = 450.0, infiniband_gbps: float = 50.0,
            partition: str = '', account: str = '', qos: str = '', grace_s: int = 300,
            cpus_per_task: int = 0, max_restarts: int = 20, max_stalled_restarts: int = 3,
            max_excluded: int = 4, mtbf_hours: float = 0.0) -> ml_collections.ConfigDict:
  """The `cluster` section of a large experiment: what its SLURM job asks for.

  gpu names a type of brainscale/plan/gpu.py:GPUS (H100-SXM-80GB, H200-SXM-141GB).
  nvlink_gbps / infiniband_gbps: GB/s per GPU per direction within a node and
  across nodes (a 400 Gb/s NIC per GPU is 50), for plan mode's speed estimate.
  gpus_per_node=0 is a CPU job. tasks_per_node=0 is one task per GPU (1 for a CPU job);
  grace_s is how long before time_limit the tasks get SIGTERM, to checkpoint;
  '' and 0 leave partition, account, qos and cpus_per_task to the cluster's defaults.
  The campaign (launch/campaign.py): at most max_restarts restarts after failures over the
  whole run, a stop after max_stalled_restarts in a row without a new checkpoint, at most
  max_excluded nodes left out (never so many that the job no longer fits the partition).
  mtbf_hours: the job's mean time between interruptions for --mode=plan's goodput; 0 is
  Llama 3's rate per GPU (419 in 54 days on 16,384 GPUs) times the job's GPUs.
  """
  return ml_collections.ConfigDict(dict(
      nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node, gpu=gpu,
      nvlink_gbps=nvlink_gbps, infiniband_gbps=infiniband_gbps, time_limit=time_limit,
      partition=partition, account=account, qos=qos, grace_s=grace_s,
      cpus_per_task=cpus_per_task, max_restarts=max_restarts,
      max_stalled_restarts=max_stalled_restarts, max_excluded=max_excluded,
      mtbf_hours=mtbf_hours))
