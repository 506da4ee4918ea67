#!/usr/bin/env bash
# GCE spot VM startup script: install trainer, run the job until it completes.
#
# Runs on every boot (a stopped spot VM that is started again reruns it), so it
# is idempotent: the venv is made once, and `trainer train` resumes from the
# workdir's newest checkpoint. Configuration comes from instance metadata, set
# by `trainer submit --target=gce` with --metadata-from-file:
#   trainer-job       URL of the job spec TOML (gs://.../job.toml)
#   trainer-workdir   the run's gs:// URL
#   trainer-package   pip requirement of trainer (git+https URL, or a wheel,
#                     local path or gs:// URL); empty: already installed
#   trainer-set       --set overrides, one per line (optional)
#   trainer-on-done   "delete" (default) or "stop": what to do once completed
#
# Exit codes of `trainer train` (design.md): 0 done -> delete/stop the VM;
# 75 preempted or deadline after a durable checkpoint -> exit and let GCE stop
# the VM (start it again, or re-create it, to resume); 2 bad input -> stop the
# VM (retrying cannot help); anything else -> retry a few times, then stop.
set -uo pipefail

METADATA_URL="${TRAINER_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
TRAINER_HOME="${TRAINER_HOME:-/opt/trainer}"
MAX_FAILURES="${TRAINER_MAX_FAILURES:-3}"

log() { echo "trainer-startup: $*" >&2; }

metadata() {  # metadata PATH: a value, or empty when it is not set.
  curl -sf -H "Metadata-Flavor: Google" "${METADATA_URL}/$1" || true
}

vm_done() {  # vm_done ACTION: stop or delete this VM.
  local name zone
  name="$(metadata instance/name)"
  zone="$(metadata instance/zone)"
  zone="${zone##*/}"
  log "${1}ing VM ${name} (${zone})"
  gcloud compute instances "$1" "${name}" --zone="${zone}" --quiet
}

JOB="$(metadata instance/attributes/trainer-job)"
WORKDIR="$(metadata instance/attributes/trainer-workdir)"
PACKAGE="$(metadata instance/attributes/trainer-package)"
OVERRIDES="$(metadata instance/attributes/trainer-set)"
ON_DONE="$(metadata instance/attributes/trainer-on-done)"
ON_DONE="${ON_DONE:-delete}"

if [[ -z "${JOB}" || -z "${WORKDIR}" ]]; then
  log "metadata trainer-job and trainer-workdir are required; stopping"
  vm_done stop
  exit 2
fi

if [[ -n "${PACKAGE}" && ! -x "${TRAINER_HOME}/venv/bin/trainer" ]]; then
  log "installing ${PACKAGE}"
  # Debian's python3 has venv without ensurepip (in python3-venv); pip needs
  # git for a git+https requirement.
  if ! python3 -c "import ensurepip" >/dev/null 2>&1 || ! command -v git >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv git
  fi
  python3 -m venv "${TRAINER_HOME}/venv"
  if [[ "${PACKAGE}" == gs://* ]]; then
    # A wheel in Cloud Storage; an extra such as "[gpu]" stays on the local path.
    url="${PACKAGE%%\[*}"
    extra="${PACKAGE#"${url}"}"
    gcloud storage cp "${url}" "${TRAINER_HOME}/" || { vm_done stop; exit 1; }
    PACKAGE="${TRAINER_HOME}/$(basename "${url}")${extra}"
  fi
  if ! "${TRAINER_HOME}/venv/bin/pip" install --quiet "${PACKAGE}"; then
    log "pip install ${PACKAGE} failed; stopping"
    vm_done stop
    exit 1
  fi
fi
if [[ -x "${TRAINER_HOME}/venv/bin/trainer" ]]; then
  export PATH="${TRAINER_HOME}/venv/bin:${PATH}"
fi

args=(train "--job=${JOB}" "--workdir=${WORKDIR}")
while IFS= read -r line; do
  [[ -n "${line}" ]] && args+=("--set=${line}")
done <<< "${OVERRIDES}"

failures=0
while true; do
  log "running: trainer ${args[*]}"
  trainer "${args[@]}"
  rc=$?
  case "${rc}" in
    0)
      log "completed: ${WORKDIR}/summary.json"
      vm_done "${ON_DONE}"
      exit 0
      ;;
    75)
      # Preempted after a durable checkpoint: GCE is stopping this VM.
      log "preempted; start the VM again (or re-submit) to resume"
      exit 0
      ;;
    2)
      log "bad input (see the message above); stopping the VM"
      vm_done stop
      exit 2
      ;;
    *)
      failures=$((failures + 1))
      if (( failures >= MAX_FAILURES )); then
        log "failed ${failures} times (last exit ${rc}); stopping the VM"
        vm_done stop
        exit 1
      fi
      log "exit ${rc}; retrying from the last checkpoint in 30 s"
      sleep "${TRAINER_RETRY_SECONDS:-30}"
      ;;
  esac
done
