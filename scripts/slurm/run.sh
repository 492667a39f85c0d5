#!/usr/bin/env bash
# One task of an attribution job; every sbatch script here runs it through `srun`.
# The Trainer's topology comes from SLURM itself, so the sbatch header is the single place where
# nodes and tasks are set: Lightning's SLURMEnvironment reads the ranks, and requires
# trainer.devices == --ntasks-per-node and trainer.num_nodes == --nodes, which is what we pass.
#
# Environment: CONFIG (YAML, required), PYTHON (interpreter, default python),
#              EXTRA_ARGS (more command-line overrides, word-split).
set -euo pipefail
: "${CONFIG:?set CONFIG to the YAML config to run}"
: "${SLURM_NTASKS_PER_NODE:?submit with --ntasks-per-node (one task per device)}"
# shellcheck disable=SC2086
exec "${PYTHON:-python}" train.py fit -c "$CONFIG" \
    --trainer.num_nodes "${SLURM_JOB_NUM_NODES:-1}" \
    --trainer.devices "${SLURM_NTASKS_PER_NODE%%(*}" \
    --trainer.strategy m2ib_ddp \
    ${EXTRA_ARGS:-}
