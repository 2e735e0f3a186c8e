#!/usr/bin/env bash
# Runs the Mono build. Mono 6.8 can hang in thread suspension without
# preemptive suspend (pythonnet runs its own Mono tests this way, PR 1779).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export MONO_THREADS_SUSPEND=preemptive
exec mono "$here/bin/EmbeddedWorkerHost.exe" "$@"
