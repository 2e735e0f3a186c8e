#!/usr/bin/env bash
# Builds with Mono's mcs (C# 7.2) against the Python.Runtime.dll of the pythonnet wheel in the project's
# virtual environment: the library (lib/ -> EmbeddedWorker.dll, what a service references) and the sample
# app (app/ -> EmbeddedWorkerHost.exe). The same sources as the SDK projects (lib/EmbeddedWorker.csproj,
# app/EmbeddedWorkerHost.csproj); files only an SDK build can compile live in lib/Hosting/ and are left out.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${EMBEDDED_WORKER_VENV:-$here/../.venv}"
if ! command -v mcs >/dev/null; then
    echo "mcs not found: install Mono (Debian: apt-get install -y mono-devel), or use the .NET SDK build (dotnet run)" >&2
    exit 2
fi
runtime_dll="$("$venv/bin/python" -c 'import os, pythonnet; print(os.path.join(os.path.dirname(pythonnet.__file__), "runtime", "Python.Runtime.dll"))')"
facades="$(dirname "$(readlink -f "$(command -v mono)")")/../lib/mono/4.5/Facades"
out="$here/bin"
mkdir -p "$out"
cp "$runtime_dll" "$out/Python.Runtime.dll"
common=(-langversion:7.2 -unsafe -optimize+ -nologo -r:"$out/Python.Runtime.dll" -r:"$facades/netstandard.dll"
        -r:Microsoft.CSharp.dll -r:System.Numerics.dll -r:System.Core.dll)
mapfile -t library < <(find "$here/lib" -name '*.cs' -not -path '*/Hosting/*' -not -path '*/obj/*' | sort)
mapfile -t app < <(find "$here/app" -name '*.cs' -not -path '*/obj/*' | sort)
mcs "${common[@]}" -target:library -out:"$out/EmbeddedWorker.dll" -doc:"$out/EmbeddedWorker.xml" -nowarn:1591 "${library[@]}"
mcs "${common[@]}" -target:exe -out:"$out/EmbeddedWorkerHost.exe" -r:"$out/EmbeddedWorker.dll" "${app[@]}"
echo "built $out/EmbeddedWorker.dll and $out/EmbeddedWorkerHost.exe"
