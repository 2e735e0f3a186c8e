#!/usr/bin/env bash
# Runs the host built by build.sh, on Mono (the default) or on CoreCLR:
#
#   run.sh [--runtime mono|coreclr] [host arguments]     (or EMBEDDED_WORKER_RUNTIME=coreclr)
#   run.sh --runtime coreclr --probe                     prints the dotnet it would use; exit 3 when none
#
# Mono 6.8 can hang in thread suspension without preemptive suspend
# (pythonnet runs its own Mono tests this way, PR 1779).
# CoreCLR: EMBEDDED_WORKER_DOTNET when set, else the dotnetcore2 runtime in the
# virtual environment (the test dependency `make setup` installs), else a
# `dotnet` on PATH. bin/EmbeddedWorkerHost.runtimeconfig.json (build.sh) names
# the framework; invariant globalization, since no ICU is installed here.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${EMBEDDED_WORKER_VENV:-$here/../.venv}"
runtime="${EMBEDDED_WORKER_RUNTIME:-mono}"
if [ "${1:-}" = "--runtime" ]; then runtime="${2:?--runtime needs mono or coreclr}"; shift 2; fi

find_dotnet() {
    if [ -n "${EMBEDDED_WORKER_DOTNET:-}" ]; then echo "$EMBEDDED_WORKER_DOTNET"; return; fi
    local bundled
    bundled="$("$venv/bin/python" -c 'import importlib.util, os
spec = importlib.util.find_spec("dotnetcore2")
print(os.path.join(os.path.dirname(spec.origin), "bin", "dotnet") if spec else "")' 2>/dev/null || true)"
    if [ -n "$bundled" ] && [ -x "$bundled" ]; then echo "$bundled"; return; fi
    command -v dotnet 2>/dev/null || true
}

case "$runtime" in
    mono)
        if [ "${1:-}" = "--probe" ]; then command -v mono || exit 3; exit 0; fi
        export MONO_THREADS_SUSPEND=preemptive
        exec mono "$here/bin/EmbeddedWorkerHost.exe" "$@"
        ;;
    coreclr)
        dotnet="$(find_dotnet)"
        if [ -z "$dotnet" ]; then
            echo "no CoreCLR found: pip install dotnetcore2 into $venv (make setup does), set EMBEDDED_WORKER_DOTNET, or put dotnet on PATH" >&2
            exit 3
        fi
        if [ "${1:-}" = "--probe" ]; then echo "$dotnet"; exit 0; fi
        export DOTNET_SYSTEM_GLOBALIZATION_INVARIANT="${DOTNET_SYSTEM_GLOBALIZATION_INVARIANT:-1}"
        export DOTNET_CLI_TELEMETRY_OPTOUT=1
        exec "$dotnet" "$here/bin/EmbeddedWorkerHost.exe" "$@"
        ;;
    *)
        echo "unknown runtime '$runtime': mono or coreclr" >&2
        exit 2
        ;;
esac
