#!/usr/bin/env bash
# make demo: start numerusd on a fresh state directory (it embeds its own nats-server), run a real planned job with
# the scripted agent in every role on a fresh git repository, approve its plan when it waits for approval, and show
# what happened: the plan, status, terminal output, events, audit, the diff of the result, and `accept` taking it
# into the repository's main branch.
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

step "numerusctl run 'Welcome newcomers' --repo $repo --agent scripted --parallel 2 --approve plan"
job=$("$BIN/numerusctl" run "Welcome newcomers" --repo "$repo" --agent scripted --parallel 2 --approve plan)
echo "$job"

status_of() { "$BIN/numerusctl" --json status "$job" | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["jobs"][0]["status"])'; }
wait_for() {  # wait_for STATUS...: until the job is in one of them
  for _ in $(seq 600); do
    case " $* " in *" $(status_of) "*) return 0 ;; esac
    sleep 0.1
  done
  echo "the job did not reach $*: it is $(status_of)" >&2; exit 1
}
wait_for awaiting_approval

step "numerusctl plan last   (the validated plan waits for a person: no agent works on it yet)"
"$BIN/numerusctl" plan last

step "numerusctl approve last"
"$BIN/numerusctl" approve last
wait_for completed failed killed

step "numerusctl status $job"
"$BIN/numerusctl" status "$job"

step "numerusctl logs $job sign   (the agent's terminal)"
"$BIN/numerusctl" logs "$job" sign

step "numerusctl events $job   (the signed, chained record in JetStream)"
"$BIN/numerusctl" events "$job"

step "numerusctl audit verify $job"
"$BIN/numerusctl" audit verify "$job"

step "numerusctl diff $job --stat   (the result, against the commit the job started from)"
"$BIN/numerusctl" diff "$job" --stat

step "numerusctl accept $job   (main fast-forwarded to the result: the working tree was clean)"
"$BIN/numerusctl" accept "$job"
git -C "$repo" log --oneline --graph main
git -C "$repo" show main:HELLO.md
