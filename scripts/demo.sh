#!/usr/bin/env bash
# make demo: start numerusd on a fresh state directory (it embeds its own nats-server), run a real planned job with
# the scripted agent in every role on a fresh git repository, and show what happened: the plan, status, terminal
# output, events, audit, and the integration branch the work was merged into.
set -euo pipefail
BIN=${BIN:-.venv/bin}
BIN=$(cd "$BIN" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/numerus-demo.XXXXXX")
export NUMERUS_STATE_DIR="$work/state"
export NUMERUS_SCENARIO
NUMERUS_SCENARIO=$("$BIN/python" -c 'import numerusd, pathlib; print(pathlib.Path(numerusd.__file__).parent / "demo" / "team.json")')
repo="$work/repo"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

git init -q -b main "$repo"
printf '# demo\n' > "$repo/README.md"
git -C "$repo" add README.md
git -C "$repo" -c user.name=demo -c user.email=demo@example.invalid commit -q -m "initial commit"

step "numerusd starts (embedded nats-server, state in $NUMERUS_STATE_DIR)"
"$BIN/numerusd" --log-level warning &
daemon=$!
stop_daemon() { kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true; }
trap stop_daemon EXIT
for _ in $(seq 100); do
  "$BIN/numerusctl" status >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { echo "numerusd did not start" >&2; exit 1; }
  sleep 0.1
done

step "numerusctl run 'Welcome newcomers' --repo $repo --agent scripted --parallel 2 --wait"
"$BIN/numerusctl" run "Welcome newcomers" --repo "$repo" --agent scripted --parallel 2 --wait
job=$("$BIN/numerusctl" --json status | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["jobs"][0]["id"])')

step "numerusctl plan $job"
"$BIN/numerusctl" plan "$job"

step "numerusctl status $job"
"$BIN/numerusctl" status "$job"

step "numerusctl logs $job --task sign   (the agent's terminal)"
"$BIN/numerusctl" logs "$job" --task sign

step "numerusctl events $job   (the signed, chained record in JetStream)"
"$BIN/numerusctl" events "$job"

step "numerusctl audit verify $job"
"$BIN/numerusctl" audit verify "$job"

step "the integration branch numerus/$job.integration (the user's branch is untouched)"
git -C "$repo" log --oneline --graph "numerus/$job.integration"
git -C "$repo" show "numerus/$job.integration:HELLO.md"
