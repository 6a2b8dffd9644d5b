#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, client) and munge, if missing.
#
# Idempotent: does nothing when slurmctld, slurmd, sbatch and munged are all on
# PATH (or in /usr/sbin). Needs root when it has to install. No service is
# started: a temporary policy-rc.d (exit 101) is put in place if the image has
# none, and removed again afterwards.
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"

# Never run a Slurm client here to get its version: without SLURM_CONF it
# falls back to "configless" mode and sends a DNS SRV query to the resolver.
slurm_version() {
    dpkg-query -W -f='slurm-client ${Version}' slurm-client 2>/dev/null || echo "version unknown"
}

missing=()
for cmd in slurmctld slurmd sbatch munged mungekey; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install.sh: slurm and munge already installed ($(slurm_version))"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: missing ${missing[*]}; need root to apt-get install them" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
added_policy=0
cleanup() {
    if [ "$added_policy" -eq 1 ]; then
        rm -f "$policy"
    fi
}
trap cleanup EXIT
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
fi

echo "install.sh: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    slurmctld slurmd slurm-client munge
echo "install.sh: done ($(slurm_version))"
