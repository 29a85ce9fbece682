#!/usr/bin/env bash
# Train with `accelerate launch`, choosing a config from configs/accelerate (one launcher per machine).
#   bash launch/train.sh --config configs/lol_v1.yaml [key.sub=value ...] [--resume latest|PATH] [--overwrite]
# The arguments are those of `semi-llie train`; paths are relative to the project root. Environment:
#   ACCELERATE_CONFIG  a name in configs/accelerate (single_gpu, multi_gpu, multi_node, cpu_2proc,
#                      deepspeed_zero1, deepspeed_zero2) or a YAML path. Default: multi_node when NUM_MACHINES > 1,
#                      else multi_gpu on 2+ visible GPUs, else single_gpu.
#   NUM_PROCESSES      processes on this machine (default: the visible GPUs; on CPU 1 with NUM_MACHINES set,
#                      else the config's count)
#   DEVICE=cpu         ignore any GPU: CPU processes that talk over gloo
#   NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT
#                      several machines (slurm/train.sbatch sets them in each node's task); rank 0 hosts the
#                      c10d rendezvous at MAIN_PROCESS_IP:MAIN_PROCESS_PORT
#   PREEMPT_GRACE      seconds the launcher lets its workers spend checkpointing after SIGTERM/SIGUSR1 (110)
#   DRY_RUN=1          print the launch command and exit
# Signals: SIGTERM and SIGUSR1 reach the workers, which save a checkpoint and exit 75 (semi_llie/engine/distributed.py).
set -euo pipefail
cd "$(dirname "$0")/.."

[[ -x .venv/bin/accelerate ]] && PATH="$PWD/.venv/bin:$PATH"

visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    local ids=${CUDA_VISIBLE_DEVICES//[[:space:]]/}
    if [[ -z "$ids" ]]; then echo 0; else awk -F, '{ print NF }' <<<"$ids"; fi
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

machines=${NUM_MACHINES:-1}
gpus=0
case "${DEVICE:-}" in
  cpu)
    # Hidden GPUs make torch pick gloo; ACCELERATE_USE_CPU keeps Accelerate's multi-process launcher on CPU.
    export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=true ;;
  "")
    gpus=$(visible_gpus) ;;
  *)
    echo "launch/train.sh: DEVICE must be cpu or unset (GPUs are used when visible), got '$DEVICE'" >&2
    exit 2 ;;
esac

config=${ACCELERATE_CONFIG:-}
if [[ -z "$config" ]]; then
  if (( machines > 1 )); then config=multi_node
  elif (( gpus > 1 )); then config=multi_gpu
  else config=single_gpu
  fi
fi
[[ "$config" == */* || "$config" == *.yaml ]] || config="configs/accelerate/$config.yaml"
if [[ ! -f "$config" ]]; then
  echo "launch/train.sh: accelerate config $config not found; use a name from configs/accelerate or a path" >&2
  exit 2
fi

per_machine=${NUM_PROCESSES:-}
if [[ -z "$per_machine" ]] && (( gpus > 0 )); then
  per_machine=$gpus
elif [[ -z "$per_machine" && -n "${NUM_MACHINES:-}" ]]; then
  per_machine=1  # a CPU node under slurm/train.sbatch: one process unless told otherwise
fi

launch=(accelerate launch --config_file "$config")
[[ -n "$per_machine" ]] && launch+=(--num_processes "$(( per_machine * machines ))")
[[ -n "${NUM_MACHINES:-}" ]] && launch+=(--num_machines "$machines")
if (( machines > 1 )); then
  rank=${MACHINE_RANK:?launch/train.sh: NUM_MACHINES > 1 needs MACHINE_RANK}
  # is_host says who serves the rendezvous store: torch's guess from the address fails on hosts with
  # several NICs, and when several "nodes" share one host (as in tests/test_slurm.py).
  launch+=(--machine_rank "$rank" --rdzv_conf "is_host=$(( rank == 0 ))"
           --main_process_ip "${MAIN_PROCESS_IP:?launch/train.sh: NUM_MACHINES > 1 needs MAIN_PROCESS_IP}"
           --main_process_port "${MAIN_PROCESS_PORT:-29500}")
elif [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then
  launch+=(--main_process_port "$MAIN_PROCESS_PORT")
fi

# torchrun (Accelerate's multi-process launcher, configured through its PET_* variables) forwards these
# signals to its workers and waits for them; SIGUSR1 is not in its default list, and its default wait (30 s)
# is short for a checkpoint.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export PET_SHUTDOWN_TIMEOUT=${PREEMPT_GRACE:-110}

echo "launch/train.sh: ${launch[*]} -m semi_llie train $*" >&2
[[ "${DRY_RUN:-}" == 1 ]] && exit 0
exec "${launch[@]}" -m semi_llie train "$@"
