#!/usr/bin/env bash
# Builds the host with Mono's mcs (C# 7.2) against the Python.Runtime.dll of
# the pythonnet wheel installed in the project's virtual environment.
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
mcs -langversion:7.2 -unsafe -optimize+ -nologo -target:exe -out:"$out/EmbeddedWorkerHost.exe" \
    -r:"$out/Python.Runtime.dll" -r:"$facades/netstandard.dll" -r:Microsoft.CSharp.dll -r:System.Numerics.dll \
    "$here"/src/*.cs
echo "built $out/EmbeddedWorkerHost.exe"
