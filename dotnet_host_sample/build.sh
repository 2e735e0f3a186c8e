#!/usr/bin/env bash
# Builds with Mono's mcs (C# 7.2) against the Python.Runtime.dll of the pythonnet wheel in the project's
# virtual environment: the library (lib/ -> EmbeddedWorker.dll, what a service references) and the sample
# app (app/ -> EmbeddedWorkerHost.exe). The same sources as the SDK projects (lib/EmbeddedWorker.csproj,
# app/EmbeddedWorkerHost.csproj); files only an SDK build can compile live in lib/Hosting/ and are left out.
#   build.sh --list   prints what it would compile (flags, then `library FILE` / `app FILE`), builds nothing:
#                     tests/test_sdk_projects.py holds the .csproj files to the same.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${EMBEDDED_WORKER_VENV:-$here/../.venv}"
flags=(-langversion:7.2 -unsafe -optimize+ -nologo)
mapfile -t library < <(find "$here/lib" -name '*.cs' -not -path '*/Hosting/*' -not -path '*/obj/*' -not -path '*/bin/*' | sort)
mapfile -t app < <(find "$here/app" -name '*.cs' -not -path '*/obj/*' -not -path '*/bin/*' | sort)
if [ "${1:-}" = "--list" ]; then
    echo "flags ${flags[*]}"
    printf 'library %s\n' "${library[@]#$here/}"
    printf 'app %s\n' "${app[@]#$here/}"
    exit 0
fi
if ! command -v mcs >/dev/null; then
    echo "mcs not found: install Mono (Debian: apt-get install -y mono-devel), or use the .NET SDK build (dotnet run)" >&2
    exit 2
fi
runtime_dll="$("$venv/bin/python" -c 'import os, pythonnet; print(os.path.join(os.path.dirname(pythonnet.__file__), "runtime", "Python.Runtime.dll"))')"
facades="$(dirname "$(readlink -f "$(command -v mono)")")/../lib/mono/4.5/Facades"
out="$here/bin"
mkdir -p "$out"
cp "$runtime_dll" "$out/Python.Runtime.dll"
common=("${flags[@]}" -r:"$out/Python.Runtime.dll" -r:"$facades/netstandard.dll"
        -r:Microsoft.CSharp.dll -r:System.Numerics.dll -r:System.Core.dll)
mcs "${common[@]}" -target:library -out:"$out/EmbeddedWorker.dll" -doc:"$out/EmbeddedWorker.xml" -nowarn:1591 "${library[@]}"
mcs "${common[@]}" -target:exe -out:"$out/EmbeddedWorkerHost.exe" -r:"$out/EmbeddedWorker.dll" "${app[@]}"
# CoreCLR runs the same exe (run.sh --runtime coreclr) when this file names its framework: 3.1 or any later
# major (.NET 8 included) when 3.1 is not installed.
cat > "$out/EmbeddedWorkerHost.runtimeconfig.json" <<'JSON'
{"runtimeOptions": {"tfm": "netcoreapp3.1", "rollForward": "Major",
                    "framework": {"name": "Microsoft.NETCore.App", "version": "3.1.0"},
                    "configProperties": {"System.Globalization.Invariant": true}}}
JSON
echo "built $out/EmbeddedWorker.dll and $out/EmbeddedWorkerHost.exe (+ runtimeconfig.json for CoreCLR)"
