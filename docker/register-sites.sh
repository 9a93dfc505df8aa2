#!/usr/bin/env bash
# Register the enrolled sites' node-authentication keys with the compose SuperLink.
#
# Run once from any directory on the Docker host, after `docker compose ... up -d superlink`
# (the SuperLink must be listening) and before the sites can join; the SuperNodes keep
# retrying until their key is registered. Needs fedllm's environment on the host (`fedllm`
# and `flwr` on PATH: `source .venv/bin/activate`).
#
#   1. writes the Flower connection `fedllm-docker` (address + the federation's CA) into
#      $FLWR_HOME/config.toml (default ~/.flwr) with Flower's own helpers (`fedllm
#      federation add`), so `flwr run . fedllm-docker` finds it;
#   2. waits for the SuperLink's TLS port;
#   3. `fedllm pki register`: `flwr supernode register` for every site in the coordinator's
#      signed registry (`fedllm pki enrol` put them there; the registry is verified first),
#      under the site's name (a key that is already registered is reported and skipped).
#
# Settings (environment): PKI (${FEDLLM_KEYS:-keys}/pki), CONNECTION (fedllm-docker),
# SUPERLINK_ADDRESS (127.0.0.1:9092, the port compose.yaml publishes), SITES ("site-0 site-1
# site-2"), WAIT_SECONDS (120).
set -euo pipefail

cd "$(dirname "$0")/.."
PKI="${PKI:-${FEDLLM_KEYS:-keys}/pki}"
CONNECTION="${CONNECTION:-fedllm-docker}"
SUPERLINK_ADDRESS="${SUPERLINK_ADDRESS:-127.0.0.1:9092}"
SITES="${SITES:-site-0 site-1 site-2}"
WAIT_SECONDS="${WAIT_SECONDS:-120}"

die() {
  echo "register-sites.sh: $*" >&2
  exit 1
}

for tool in fedllm flwr python; do
  command -v "$tool" >/dev/null || die "'$tool' is not on PATH; run: source .venv/bin/activate"
done
[ -f "$PKI/ca.pem" ] || die "no $PKI/ca.pem; first run: fedllm pki init --out $PKI --hosts superlink,localhost,127.0.0.1"
[ -f "$PKI/registry.json" ] || die "no $PKI/registry.json; fedllm pki init writes it, fedllm pki enrol adds each site"

# 1. The Flower connection, written by Flower's config helpers (absolute CA path).
fedllm federation add "$CONNECTION" --address "$SUPERLINK_ADDRESS" --root-certificates "$PKI/ca.pem"

# 2. Wait until the SuperLink accepts TCP connections on its (TLS) port.
python - "$SUPERLINK_ADDRESS" "$WAIT_SECONDS" <<'PY' || die "no SuperLink at $SUPERLINK_ADDRESS after ${WAIT_SECONDS}s; start it: docker compose -f docker/compose.yaml up -d superlink"
import socket
import sys
import time

host, _, port = sys.argv[1].rpartition(":")
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(1)
PY

# 3. Register every enrolled site's public node-auth key (a re-run skips keys already
#    registered: fedllm pki register reports them).
fedllm pki register --dir "$PKI" --federation "$CONNECTION" --sites "${SITES// /,}"
echo "Sites registered with $SUPERLINK_ADDRESS. Run: flwr run . $CONNECTION --stream --run-config configs/deploy.toml"
