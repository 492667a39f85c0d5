#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for testing requeue and multi-task jobs for real.
#
#   bash scripts/slurm/local_cluster.sh install   # apt-get install slurm-wlm munge (as root)
#   bash scripts/slurm/local_cluster.sh start     # write slurm.conf, start munged, slurmctld, slurmd
#   bash scripts/slurm/local_cluster.sh stop
#
# Runs as root (SlurmUser=root) with the plugins that work in an unprivileged container:
# proctrack/linuxproc, task/none, select/cons_tres. Not for production clusters.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurm-m2ib
LOG_DIR=/var/log/slurm-m2ib

install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave headroom for the OS; slurmd refuses to start if RealMemory exceeds what it sees.
    mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
    mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"
    cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=m2ib-local
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/d
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SchedulerType=sched/backfill
KillWait=30
InactiveLimit=0
MinJobAge=600
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
    # No cgroup.conf: with proctrack/linuxproc and task/none nothing needs cgroups (and
    # Slurm 22.05 has no "disabled" cgroup plugin to name).
    rm -f "$CONF_DIR/cgroup.conf"
}

start() {
    command -v slurmctld >/dev/null || { echo "slurmctld not installed (run: $0 install)" >&2; exit 1; }
    write_conf
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
    fi
    chown -R munge:munge /etc/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    if ! pgrep -x munged >/dev/null; then
        if id munge >/dev/null 2>&1; then
            su -s /bin/sh munge -c "munged" || munged --force
        else
            munged --force
        fi
    fi
    pgrep -x slurmctld >/dev/null || slurmctld -c
    pgrep -x slurmd >/dev/null || slurmd -c
    for _ in $(seq 1 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            sinfo
            return 0
        fi
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "SLURM did not become ready; last log lines:" >&2
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    exit 1
}

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
}

case "${1:-start}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
