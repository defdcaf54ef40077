#!/usr/bin/env bash
# Instance-template startup script: installs vLLM and gpu-node-agent as systemd
# units on a GPU VM of the MIG. GCE runs it as root on every boot, so every step is
# idempotent. Everything it needs comes from instance metadata (provision.py and
# the gcloud commands in deploy/gce/README.md set these keys):
#   gpu-node-agent-unit     the unit file  (deploy/gce/gpu-node-agent.service)  required
#   vllm-unit               the unit file  (deploy/gce/vllm.service)            required
#   vllm-model              model to serve, e.g. Qwen/Qwen2.5-7B-Instruct        required
#   gpu-node-agent-config   /etc/gpu-node-agent/config.toml (deploy/gce/config.toml)
#   gpu-node-agent-package  pip requirement or gs:// wheel     (default gpu-node-agent)
#   vllm-package            pip requirement or gs:// wheel     (default vllm)
#   vllm-args               extra `vllm serve` arguments
# Progress and errors go to the serial console and `journalctl -u google-startup-scripts`.
set -euo pipefail

readonly MD_URL="http://metadata.google.internal/computeMetadata/v1/instance/attributes"
readonly AGENT_DIR=/opt/gpu-node-agent VLLM_DIR=/opt/vllm CACHE_DIR=/var/cache/gpu-node-agent
CHANGED=0 # set when a package, unit or config changed: then the units are restarted

log() { echo "gpu-node-agent-startup: $*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# attr KEY: the metadata value, or exit status 1 when the key is not set (404).
attr() { curl -fsS --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' "${MD_URL}/$1" 2>/dev/null; }
attr_or() { attr "$1" || printf '%s' "$2"; }
require_attr() { attr "$1" || die "instance metadata key '$1' is not set"; }

pick_python() {
  # The agent needs Python >= 3.11; Ubuntu 22.04 has it as an extra package.
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
      "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  log "no Python >= 3.11 with venv; installing python3.11-venv"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-venv >&2
  echo python3.11
}

wait_for_gpu() {
  # On images that install the driver at first boot, the driver can arrive after us.
  local _
  for _ in $(seq 1 60); do
    if nvidia-smi -L >/dev/null 2>&1; then
      # Persistence mode keeps the driver loaded and /dev/nvidia* present between
      # vLLM restarts; the agent (non-root, no module loading) relies on that.
      nvidia-smi -pm 1 >/dev/null 2>&1 || log "could not enable persistence mode"
      return 0
    fi
    sleep 10
  done
  die "no NVIDIA driver after 10 minutes (nvidia-smi fails): use an image with the driver"
}

ensure_user() {
  id -u "$1" >/dev/null 2>&1 || useradd --system --home-dir "$2" --shell /usr/sbin/nologin "$1"
}

# install_venv DIR SPEC: (re)install SPEC into DIR/venv only when SPEC changed.
install_venv() {
  local dir=$1 spec=$2 python target marker="$1/.installed-spec"
  if [[ -f "$marker" && "$(cat "$marker")" == "$spec" ]]; then
    log "$dir: $spec already installed"; return 0
  fi
  python=$(pick_python)
  target=$spec
  if [[ "$spec" == gs://* ]]; then
    mkdir -p "$CACHE_DIR"
    gcloud storage cp "$spec" "$CACHE_DIR/" >&2
    target="$CACHE_DIR/${spec##*/}"
  fi
  log "$dir: installing $spec"
  rm -rf "$dir/venv"
  "$python" -m venv "$dir/venv"
  "$dir/venv/bin/pip" install --quiet --upgrade pip
  "$dir/venv/bin/pip" install --quiet "$target"
  printf '%s' "$spec" >"$marker"
  CHANGED=1
}

# write_file PATH MODE CONTENT: atomic (a reboot mid-write leaves the old file),
# and only when the content differs.
write_file() {
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  printf '%s\n' "$3" >"$tmp"
  chmod "$2" "$tmp"
  if cmp -s "$tmp" "$1"; then
    rm -f "$tmp"; return 0
  fi
  mv -f "$tmp" "$1"
  CHANGED=1
}

main() {
  local agent_unit vllm_unit model config
  agent_unit=$(require_attr gpu-node-agent-unit)
  vllm_unit=$(require_attr vllm-unit)
  model=$(require_attr vllm-model)
  wait_for_gpu

  ensure_user vllm /var/lib/vllm
  ensure_user gpu-node-agent /var/lib/gpu-node-agent
  install_venv "$VLLM_DIR" "$(attr_or vllm-package vllm)"
  install_venv "$AGENT_DIR" "$(attr_or gpu-node-agent-package gpu-node-agent)"
  # `gpu-node-agent status|drain|resume` on the PATH for whoever logs in.
  ln -sfn "$AGENT_DIR/venv/bin/gpu-node-agent" /usr/local/bin/gpu-node-agent

  mkdir -p /etc/gpu-node-agent
  if config=$(attr gpu-node-agent-config); then
    write_file /etc/gpu-node-agent/config.toml 0644 "$config"
  elif [[ ! -f /etc/gpu-node-agent/config.toml ]]; then
    write_file /etc/gpu-node-agent/config.toml 0644 "# defaults (no gpu-node-agent-config metadata)"
  fi
  "$AGENT_DIR/venv/bin/gpu-node-agent" check-config --config /etc/gpu-node-agent/config.toml >/dev/null ||
    die "gpu-node-agent-config is invalid (gpu-node-agent check-config says why)"
  write_file /etc/default/vllm 0644 \
    "$(printf 'VLLM_MODEL=%s\nVLLM_EXTRA_ARGS=%s' "$model" "$(attr_or vllm-args '')")"
  write_file /etc/systemd/system/vllm.service 0644 "$vllm_unit"
  write_file /etc/systemd/system/gpu-node-agent.service 0644 "$agent_unit"

  systemctl daemon-reload
  systemctl enable vllm.service gpu-node-agent.service
  if ((CHANGED)); then
    # Something new (first boot, a new package or unit): restart. The agent is
    # stopped first and drains; vLLM then reloads the model.
    systemctl restart vllm.service gpu-node-agent.service
  else
    # A plain reboot: the units are already up (or starting); don't reload the model.
    systemctl start vllm.service gpu-node-agent.service
  fi
  log "vllm.service and gpu-node-agent.service running (model $model, changed=$CHANGED)"
}

main "$@"
