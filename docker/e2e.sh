#!/usr/bin/env bash
# The Docker deployment, built and run end to end on this host: a SuperLink and three sites in
# containers, each site with its own keys (made by `fedllm site init`), its own data in its
# own format, its own policy, its own copy of the base model and its own state volume.
#
#   sudo -E env PATH="$PATH" docker/e2e.sh      # from fedllm's environment (source .venv/...)
#
# 1. starts dockerd if no engine answers (and stops it again at the end);
# 2. builds the local base from Debian packages (docker/build-local-base.sh) unless
#    E2E_BASE names another (e.g. flwr's official images on a host with a registry), then the
#    SuperLink and SuperNode images, torch from a local wheel when one is found;
# 3. makes the coordinator's keys (`fedllm pki init`), each site's (`fedllm site init`),
#    enrols them (`fedllm pki enrol`), a tiny Llama model (the tests' own, built offline) and
#    each site's data: JSONL, CSV with other field names, a `save_to_disk` folder;
# 4. brings up the SuperLink (TLS, node authentication), registers the sites, brings up the
#    sites (each pinned to the app's FAB hash), and submits a two-round signed DP job with
#    `flwr run` from this host;
# 5. copies out the run directory and every site's state, runs `fedllm audit verify` with
#    the registry, the coordinator's key and each site's ledger, prints the rounds and each
#    site's held-out loss, and tries, from inside site-0, to read site-1's key and data;
# 6. tears everything down (containers, networks, volumes; the images stay, as build cache),
#    also on failure or when E2E_TIMEOUT (seconds, default 2700) runs out.
#
# Not part of the test suite (it installs and builds for minutes); tests/test_docker.py checks
# the files statically. Needs root (dockerd, debootstrap, handing the mounted keys to the
# images' uid), and `fedllm`, `flwr` and `python` from fedllm's environment on PATH.
# Settings (environment): E2E_WORK (a new folder under /tmp), E2E_BASE (build the local
# one), E2E_TORCH_WHEEL (found in pip's find-links), E2E_TIMEOUT, E2E_ROUNDS (2).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$PWD"
WORK="${E2E_WORK:-$(mktemp -d /tmp/fedllm-e2e.XXXXXX)}"
TIMEOUT="${E2E_TIMEOUT:-2700}"
ROUNDS="${E2E_ROUNDS:-2}"
PROJECT=fedllm-e2e
RUN=e2e
T0=$(date +%s)
STARTED_DOCKERD=""
COPIED_WHEEL=""
DC=()

say() { printf '[e2e %4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() {
  echo "e2e.sh: $*" >&2
  exit 1
}

teardown() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "${WATCHDOG:-}" ]; then  # its sleep too: it holds this script's output open
    pkill -P "$WATCHDOG" 2>/dev/null || true
    kill "$WATCHDOG" 2>/dev/null || true
  fi
  if [ "${#DC[@]}" -gt 0 ] && docker info >/dev/null 2>&1; then
    say "teardown: containers, networks and volumes of project $PROJECT"
    "${DC[@]}" down --volumes --remove-orphans --timeout 10 >"$WORK/down.log" 2>&1 || true
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
    vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
    nets=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
    say "left running: $left containers, $vols volumes, $nets networks"
  fi
  [ -n "$COPIED_WHEEL" ] && rm -f "$COPIED_WHEEL"
  if [ -n "$STARTED_DOCKERD" ]; then
    say "stopping the dockerd this script started (pid $STARTED_DOCKERD)"
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
  fi
  say "done, exit code $rc; logs in $WORK"
  exit "$rc"
}
trap teardown EXIT
trap 'die "interrupted"' INT TERM
# The watchdog's own stderr goes nowhere (bash would print "Terminated" when teardown stops
# its sleep); its message goes to this script's stderr, fd 3.
( sleep "$TIMEOUT" && echo "e2e.sh: stopped after E2E_TIMEOUT=${TIMEOUT}s" >&3 && kill -TERM $$ ) 3>&2 2>/dev/null &
WATCHDOG=$!

# -- 0. what this host has -------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "run as root (dockerd, debootstrap, key ownership): sudo -E env PATH=\"\$PATH\" $0"
for tool in fedllm flwr python; do
  command -v "$tool" >/dev/null || die "'$tool' is not on PATH; run from fedllm's environment (source .venv/bin/activate)"
done
command -v docker >/dev/null || die "no container engine: install one (apt-get install docker.io)."
mkdir -p "$WORK"
say "work folder $WORK"

# -- 1. the engine -----------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || die "the docker CLI finds no engine and there is no dockerd to start (apt-get install docker.io)."
  say "no engine answers: starting dockerd"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || die "dockerd did not start: $(tail -n 3 "$WORK/dockerd.log" | tr '\n' ' ')"
fi
if docker compose version >/dev/null 2>&1; then
  DC=(docker compose)
elif command -v docker-compose >/dev/null; then
  DC=(docker-compose)
else
  die "no Compose: install the v2 plugin or v1 (apt-get install docker-compose)."
fi
say "engine $(docker version -f '{{.Server.Version}}'), compose: ${DC[*]} $("${DC[@]}" version --short 2>/dev/null || true)"
DC+=(-p "$PROJECT" -f docker/compose.yaml)

# -- 2. images ---------------------------------------------------------------------------------
BASE="${E2E_BASE:-}"
if [ -n "$BASE" ] && ! docker image inspect "$BASE" >/dev/null 2>&1; then
  docker pull -q "$BASE" >"$WORK/pull.log" 2>&1 \
    || die "the base image $BASE is not here and cannot be pulled ($(tail -n 1 "$WORK/pull.log")); unset E2E_BASE to build the local one from Debian packages (docker/build-local-base.sh)."
fi
if [ -z "$BASE" ]; then
  BASE=fedllm-base:bookworm
  if docker image inspect "$BASE" >/dev/null 2>&1; then
    say "local base $BASE already built"
  else
    say "building the local base from Debian packages"
    docker/build-local-base.sh
  fi
fi
wheel="${E2E_TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n 1 || true)}"
if [ -n "$wheel" ] && [ ! -e "docker/wheels/$(basename "$wheel")" ]; then
  cp "$wheel" docker/wheels/ && COPIED_WHEEL="docker/wheels/$(basename "$wheel")"
  say "torch from the local wheel $(basename "$wheel")"
fi
for kind in superlink supernode; do
  t=$(date +%s)
  DOCKER_BUILDKIT=0 docker build -q --force-rm --build-arg "BASE_IMAGE=$BASE" \
    --build-arg TORCH_INDEX=https://pypi.org/simple \
    -f "docker/$kind.Dockerfile" -t "fedllm-$kind:0.1.0" . >"$WORK/build-$kind.log" 2>&1 \
    || { tail -n 20 "$WORK/build-$kind.log" >&2; die "building fedllm-$kind failed (log: $WORK/build-$kind.log)"; }
  size=$(docker image inspect -f '{{.Size}}' "fedllm-$kind:0.1.0" | awk '{printf "%.2f GB", $1/1e9}')
  say "image fedllm-$kind:0.1.0 built in $(($(date +%s) - t)) s, $size (on $BASE)"
done

# -- 3. keys, model and data, each made where it belongs --------------------------------------
export FEDLLM_KEYS="$WORK/keys" FEDLLM_SITES="$WORK/sites" FEDLLM_MODELS="$WORK/models"
export FLWR_HOME="$WORK/flwr-home"
fedllm pki init --out "$FEDLLM_KEYS/pki" --hosts superlink,localhost,127.0.0.1 >"$WORK/pki.log"
for k in 0 1 2; do
  fedllm site init "site-$k" --out "$FEDLLM_KEYS/site/site-$k" --ca "$FEDLLM_KEYS/pki/ca.pem" \
    --coordinator-key "$FEDLLM_KEYS/pki/coordinator.pub" >>"$WORK/pki.log"
  fedllm pki enrol "$FEDLLM_KEYS/site/site-$k/enrolment.json" --dir "$FEDLLM_KEYS/pki" \
    --partition-id "$k" >>"$WORK/pki.log"
done
say "keys: the coordinator's, and three sites' made apart and enrolled ($(grep -c 'enrol' "$WORK/pki.log" || true) lines in pki.log)"
python - "$WORK" <<'PY'
import json
import shutil
import sys
from pathlib import Path

import datasets

sys.path.insert(0, ".")
from tests.tiny import make_tiny_model_dir

work = Path(sys.argv[1])
tiny = make_tiny_model_dir(work / "models" / "tiny")
topics, sizes = ("gardens", "rivers", "violins"), (48, 30, 64)
for k, (topic, n) in enumerate(zip(topics, sizes)):
    site = work / "sites" / f"site-{k}"
    data = site / "data"
    rows = [(f"Say something about {topic} ({i}).", f"{topic} are lovely.") for i in range(n)]
    if k == 0:
        data.mkdir(parents=True)
        lines = "".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in rows)
        (data / "records.jsonl").write_text(lines)
    elif k == 1:
        data.mkdir(parents=True)
        (data / "records.csv").write_text("q,a\n" + "".join(f'"{q}","{a}"\n' for q, a in rows))
    else:
        chats = [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in rows
        ]
        datasets.Dataset.from_list(chats).save_to_disk(str(data))
    policy = 'privacy-modes = ["record"]\nmin-noise-multiplier = 0.5\nepsilon-max = 50.0\n'
    (site / "policy.toml").write_text(policy + ("max-evaluations-per-round = 1\n" if k == 0 else ""))
    shutil.copytree(tiny, site / "model")  # the site's own copy of the base model
PY
FINGERPRINT=$(fedllm model fingerprint "$FEDLLM_MODELS/tiny" | head -n 1 | awk '{print $1}')
export SITE0_NODE_CONFIG='model="/site/model"'
export SITE1_NODE_CONFIG='model="/site/model" data-prompt-field="q" data-response-field="a"'
export SITE2_NODE_CONFIG='model="/site/model"'
say "tiny model $FINGERPRINT; site data: 48 JSONL, 30 CSV (q/a), 64 save_to_disk chat records"
# The images run as uid 49999; fedllm refuses key files others can read, so hand them over.
chown -R 49999:49999 "$FEDLLM_KEYS/pki/superlink" "$FEDLLM_KEYS/pki/registry.json" \
  "$FEDLLM_KEYS/pki/ca.pem" "$FEDLLM_KEYS/site" "$FEDLLM_SITES" "$FEDLLM_MODELS"
FEDLLM_APP_SHA256=$(fedllm site app-hash . 2>/dev/null)
export FEDLLM_APP_SHA256
say "every site pins the app's FAB: $FEDLLM_APP_SHA256"

# What each container mounts, checked before any starts: a missing file is one line naming
# it and the command that makes it.
for k in 0 1 2; do
  for f in ca.pem coordinator.pub node-auth.key signing.key; do
    [ -f "$FEDLLM_KEYS/site/site-$k/$f" ] || die "site-$k has no key file $FEDLLM_KEYS/site/site-$k/$f; make it at the site: fedllm site init site-$k --ca ca.pem --coordinator-key coordinator.pub"
  done
  [ -e "$FEDLLM_SITES/site-$k/data" ] || die "site-$k has no data at $FEDLLM_SITES/site-$k/data (its node config data=\"/site/data\")"
  [ -f "$FEDLLM_SITES/site-$k/policy.toml" ] || die "site-$k has no policy at $FEDLLM_SITES/site-$k/policy.toml (an empty file accepts what fedllm can run)"
done
for f in ca.pem registry.json superlink/server.pem superlink/server.key superlink/coordinator.key; do
  [ -f "$FEDLLM_KEYS/pki/$f" ] || die "the SuperLink has no $FEDLLM_KEYS/pki/$f; make it: fedllm pki init --out $FEDLLM_KEYS/pki --hosts superlink,localhost,127.0.0.1"
done

# -- 4. the federation -------------------------------------------------------------------------
health() { docker inspect -f '{{.State.Health.Status}}' "$("${DC[@]}" ps -q "$1")" 2>/dev/null || echo none; }
"${DC[@]}" up -d --no-build superlink >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; die "the SuperLink did not start"; }
for _ in $(seq 90); do [ "$(health superlink)" = healthy ] && break; sleep 2; done
[ "$(health superlink)" = healthy ] || die "the SuperLink is not healthy: $("${DC[@]}" logs --tail 5 superlink)"
say "SuperLink healthy (TLS, node authentication)"
PKI="$FEDLLM_KEYS/pki" docker/register-sites.sh >"$WORK/register.log" 2>&1 \
  || { cat "$WORK/register.log" >&2; die "registering the sites failed"; }
"${DC[@]}" up -d --no-build >>"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; die "the sites did not start"; }
for _ in $(seq 90); do
  joined=0
  for k in 0 1 2; do
    if "${DC[@]}" logs "site-$k" 2>/dev/null | grep -q "SuperNode ID"; then joined=$((joined + 1)); fi
  done
  [ "$joined" -eq 3 ] && break
  sleep 2
done
[ "$joined" -eq 3 ] || die "only $joined of 3 sites joined: $("${DC[@]}" logs --tail 5 site-0 site-1 site-2)"
say "three sites joined"

cat >"$WORK/run.toml" <<EOF
"run.name" = "$RUN"
"run.rounds" = $ROUNDS
"run.min-sites" = 3
"model.name" = "/models/tiny"
"model.fingerprint" = "$FINGERPRINT"
"data.source" = "/the-coordinator-holds-no-data.jsonl"
"train.local-steps" = 2
"eval.max-examples" = 8
"privacy.noise-multiplier" = 0.8
"security.sign-updates" = true
EOF
t=$(date +%s)
timeout 1200 flwr run . fedllm-docker --stream --run-config "$WORK/run.toml" >"$WORK/flwr-run.log" 2>&1 \
  || { tail -n 30 "$WORK/flwr-run.log" >&2; die "flwr run failed or timed out"; }
say "job done in $(($(date +%s) - t)) s"

# -- 5. the results, checked ---------------------------------------------------------------------
docker cp "$("${DC[@]}" ps -q superlink):/app/outputs/$RUN" "$WORK/run" >/dev/null
ledgers=()
for k in 0 1 2; do
  docker cp "$("${DC[@]}" ps -q "site-$k"):/state" "$WORK/state-$k" >/dev/null
  ledgers+=(--site-ledger "$k=$WORK/state-$k/$RUN/sites/site-$k/ledger.jsonl")
done
[ -f "$WORK/run/summary.json" ] || { tail -n 30 "$WORK/flwr-run.log" >&2; die "the job wrote no summary.json"; }
python - "$WORK/run/summary.json" <<'PY'
import json
import sys

s = json.load(open(sys.argv[1]))
print(f"status {s['status']}, {s['rounds_completed']} rounds, global held-out loss "
      + " -> ".join(f"{x:.4f}" for x in s["eval_loss"]))
for site, info in sorted(s["sites"].items()):
    losses = " -> ".join(f"{x:.4f}" for x in info["eval_loss"] if x is not None)
    print(f"site {site}: {info['num_examples']} training records, held-out loss {losses}, "
          f"epsilon {s['epsilon'].get(site, float('nan')):.3f}")
assert s["status"] == "completed", s["status"]
PY
fedllm audit verify "$WORK/run" --registry "$FEDLLM_KEYS/pki/registry.json" \
  --coordinator-key "$FEDLLM_KEYS/pki/coordinator.pub" "${ledgers[@]}" | tee "$WORK/verify.log"
for k in 0 1 2; do
  fedllm site budget --state-dir "$WORK/state-$k" --policy "$FEDLLM_SITES/site-$k/policy.toml" \
    | sed "s/^/site-$k: /" | head -n 4
done

say "isolation: what site-0's container can read"
site0=$("${DC[@]}" ps -q site-0)
docker exec "$site0" sh -c 'echo "its own key folder: $(ls /keys | tr "\n" " ")"'
docker exec "$site0" sh -c 'find / \( -path /proc -o -path /sys \) -prune -o -name "*.key" -print 2>/dev/null | sort | sed "s/^/  private key files it can see: /"'
for path in "$FEDLLM_KEYS/site/site-1/signing.key" "$FEDLLM_SITES/site-1/data/records.csv" "/keys/../site-1"; do
  if docker exec "$site0" cat "$path" >/dev/null 2>"$WORK/isolation.err"; then
    die "site-0 could read $path"
  fi
  echo "  site-0 reading $path: $(tr -d '\n' <"$WORK/isolation.err")"
done
docker exec "$site0" sh -c 'echo x > /keys/x' 2>&1 | sed 's/^/  site-0 writing its own key folder: /' || true
say "all checks passed"
