"""The command-line programs: run.py (the `brainscale` command), predict.py, slurm.py."""
