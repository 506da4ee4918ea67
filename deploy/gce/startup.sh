#!/usr/bin/env bash
# GCE spot VM startup script: install trainer, run the job until it completes.
#
# `trainer submit --target=gce` creates a managed instance group of one Spot
# VM from an instance template holding this script. When Compute Engine
# preempts the VM, the group recreates it once capacity returns (a fresh boot
# disk), and this script runs again: `trainer train` resumes from the workdir's
# newest checkpoint. Configuration comes from instance metadata:
#   trainer-job         URL of the job spec TOML (gs://.../job.toml)
#   trainer-workdir     the run's gs:// URL
#   trainer-package     pip requirement of trainer (git+https URL, or a wheel,
#                       local path or gs:// URL); empty: already installed
#   trainer-set         --set overrides, one per line (optional)
#   trainer-on-done     "delete" (default) or "stop": what to do once completed
#   trainer-group       the managed instance group this VM belongs to (optional)
#   trainer-template    its instance template (deleted with the group)
#   trainer-give-up-at  Unix time after which a revived VM stops reviving the run
#   trainer-gpu         "true": install the NVIDIA driver first if it is missing
#
# Exit codes of `trainer train` (design.md): 0 done -> leave and delete the
# group, then delete (or stop) the VM; 75 preempted after a durable checkpoint
# -> exit: GCE stops the VM and the group recreates it; 2 bad input -> leave
# the group (so it is not recreated) and stop the VM; anything else -> retry a
# few times, then the same as 2.
set -uo pipefail

METADATA_URL="${TRAINER_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
TRAINER_HOME="${TRAINER_HOME:-/opt/trainer}"
MAX_FAILURES="${TRAINER_MAX_FAILURES:-3}"

log() { echo "trainer-startup: $*" >&2; }

metadata() {  # metadata PATH: a value, or empty when it is not set.
  curl -sf -H "Metadata-Flavor: Google" "${METADATA_URL}/$1" || true
}

NAME="$(metadata instance/name)"
ZONE="$(metadata instance/zone)"
ZONE="${ZONE##*/}"
JOB="$(metadata instance/attributes/trainer-job)"
WORKDIR="$(metadata instance/attributes/trainer-workdir)"
PACKAGE="$(metadata instance/attributes/trainer-package)"
OVERRIDES="$(metadata instance/attributes/trainer-set)"
ON_DONE="$(metadata instance/attributes/trainer-on-done)"
ON_DONE="${ON_DONE:-delete}"
GROUP="$(metadata instance/attributes/trainer-group)"
TEMPLATE="$(metadata instance/attributes/trainer-template)"
GIVE_UP_AT="$(metadata instance/attributes/trainer-give-up-at)"
GPU="$(metadata instance/attributes/trainer-gpu)"

vm_done() {  # vm_done ACTION: stop or delete this VM.
  log "${1} VM ${NAME} (${ZONE})"
  gcloud compute instances "$1" "${NAME}" --zone="${ZONE}" --quiet
}

leave_group() {  # The group would recreate a VM that stops: leave it first.
  [[ -z "${GROUP}" ]] && return 0
  log "leaving managed instance group ${GROUP}"
  gcloud compute instance-groups managed abandon-instances "${GROUP}" \
    --instances="${NAME}" --zone="${ZONE}" --quiet
}

delete_group() {  # Nothing left to revive: the group and its template go.
  [[ -z "${GROUP}" ]] && return 0
  log "deleting managed instance group ${GROUP} and template ${TEMPLATE}"
  gcloud compute instance-groups managed delete "${GROUP}" --zone="${ZONE}" --quiet
  [[ -n "${TEMPLATE}" ]] && gcloud compute instance-templates delete "${TEMPLATE}" --quiet
}

halt() {  # halt CODE MESSAGE: out of the group, VM stopped for a person to look.
  log "$2"
  leave_group
  vm_done stop
  exit "$1"
}

if [[ -z "${JOB}" || -z "${WORKDIR}" ]]; then
  halt 2 "metadata trainer-job and trainer-workdir are required; stopping"
fi

if [[ -n "${GIVE_UP_AT}" ]] && (( $(date +%s) > GIVE_UP_AT )); then
  log "the run is past its give-up time ($(date -d "@${GIVE_UP_AT}" 2>/dev/null || echo "${GIVE_UP_AT}")); not reviving it"
  leave_group
  delete_group
  vm_done stop
  exit 0
fi

if [[ "${GPU}" == "true" ]] && ! nvidia-smi >/dev/null 2>&1; then
  # Google's driver installer (Compute Engine "Install GPU drivers"): it
  # reboots the VM, and this script, run again at boot, continues it.
  mkdir -p "${TRAINER_HOME}"
  attempts=$(( $(cat "${TRAINER_HOME}/driver-attempts" 2>/dev/null || echo 0) + 1 ))
  echo "${attempts}" > "${TRAINER_HOME}/driver-attempts"
  if (( attempts > 4 )); then
    halt 1 "the NVIDIA driver is still missing after ${attempts} boots; stopping"
  fi
  log "installing the NVIDIA driver (boot ${attempts}; the VM reboots)"
  installer="${TRAINER_HOME}/cuda_installer.pyz"
  curl -fsSL -o "${installer}" "${TRAINER_GPU_INSTALLER_URL:-https://storage.googleapis.com/compute-gpu-installation-us/installer/latest/cuda_installer.pyz}" \
    || halt 1 "could not download the NVIDIA driver installer; stopping"
  python3 "${installer}" install_driver || halt 1 "NVIDIA driver installation failed; stopping"
  exit 0
fi

if [[ -n "${PACKAGE}" && ! -x "${TRAINER_HOME}/venv/bin/trainer" ]]; then
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    halt 2 "this image's python3 is $(python3 -V 2>&1 || echo missing); trainer needs Python >= 3.11: use the image family debian-12 (project debian-cloud), submit's default; stopping"
  fi
  log "installing ${PACKAGE}"
  # Debian's python3 has venv without ensurepip (in python3-venv); pip needs
  # git for a git+https requirement.
  if ! python3 -c "import ensurepip" >/dev/null 2>&1 || ! command -v git >/dev/null; then
    if ! { apt-get update -qq && apt-get install -y -qq python3-venv git; }; then
      halt 1 "apt-get install python3-venv git failed; stopping"
    fi
  fi
  python3 -m venv "${TRAINER_HOME}/venv" || halt 1 "python3 -m venv failed; stopping"
  if [[ "${PACKAGE}" == gs://* ]]; then
    # A wheel in Cloud Storage; an extra such as "[gpu]" stays on the local path.
    url="${PACKAGE%%\[*}"
    extra="${PACKAGE#"${url}"}"
    gcloud storage cp "${url}" "${TRAINER_HOME}/" || halt 1 "could not copy ${url}; stopping"
    PACKAGE="${TRAINER_HOME}/$(basename "${url}")${extra}"
  fi
  if ! "${TRAINER_HOME}/venv/bin/pip" install --quiet "${PACKAGE}"; then
    halt 1 "pip install ${PACKAGE} failed; stopping"
  fi
fi
if [[ -x "${TRAINER_HOME}/venv/bin/trainer" ]]; then
  export PATH="${TRAINER_HOME}/venv/bin:${PATH}"
fi

args=(train "--job=${JOB}" "--workdir=${WORKDIR}")
while IFS= read -r line; do
  [[ -n "${line}" ]] && args+=("--set=${line}")
done <<< "${OVERRIDES}"

# The VM's shutdown (a preemption's ACPI soft-off) sends SIGTERM to this
# script and to trainer; trainer checkpoints and exits 75. Waiting on it in the
# background lets this script see that exit code instead of dying first.
trap 'log "SIGTERM: the VM is shutting down"' TERM

failures=0
while true; do
  log "running: trainer ${args[*]}"
  trainer "${args[@]}" &
  child=$!
  while true; do
    wait "${child}"
    rc=$?
    kill -0 "${child}" 2>/dev/null || break  # Else a trap interrupted the wait.
  done
  case "${rc}" in
    0)
      log "completed: ${WORKDIR}/summary.json"
      leave_group
      delete_group
      vm_done "${ON_DONE}"
      exit 0
      ;;
    75)
      # Preempted after a durable checkpoint: GCE is stopping this VM, and its
      # group recreates it when capacity returns.
      log "preempted; the managed instance group revives the run"
      exit 0
      ;;
    2)
      halt 2 "bad input (see the message above); leaving the group and stopping the VM"
      ;;
    *)
      failures=$((failures + 1))
      if (( failures >= MAX_FAILURES )); then
        halt 1 "failed ${failures} times (last exit ${rc}); leaving the group and stopping the VM"
      fi
      log "exit ${rc}; retrying from the last checkpoint in 30 s"
      sleep "${TRAINER_RETRY_SECONDS:-30}"
      ;;
  esac
done
