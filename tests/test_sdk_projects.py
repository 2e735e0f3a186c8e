"""The SDK projects stay honest: no `dotnet build` runs here, so the .csproj files are read the way MSBuild
globs them and held to what build.sh (Mono's mcs) compiles: the same sources, language version, unsafe code
and defines. The only difference allowed is lib/Hosting/, files that need packages an SDK restores: build.sh
leaves them out, and the README names each as SDK-only.
"""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

HOST = Path(__file__).resolve().parents[1] / "dotnet_host_sample"
README = Path(__file__).resolve().parents[1] / "README.md"
LIBRARY, APP = HOST / "lib" / "EmbeddedWorker.csproj", HOST / "app" / "EmbeddedWorkerHost.csproj"


def _build_sh() -> tuple[list[str], dict[str, set[str]]]:
    listed = subprocess.run([str(HOST / "build.sh"), "--list"], capture_output=True, text=True, check=True,
                            timeout=60).stdout.splitlines()
    flags = listed[0].split()[1:]
    files: dict[str, set[str]] = {"library": set(), "app": set()}
    for line in listed[1:]:
        part, path = line.split(" ", 1)
        files[part].add(path)
    return flags, files


def _properties(project: Path) -> dict[str, str]:
    return {element.tag: (element.text or "").strip() for group in ET.parse(project).getroot().iter("PropertyGroup")
            for element in group}


def _sdk_sources(project: Path) -> set[str]:
    """What the SDK compiles: **/*.cs under the project (bin/ and obj/ aside), then Compile Include/Remove."""
    folder, root = project.parent, ET.parse(project).getroot()
    files: set[Path] = set()
    if _properties(project).get("EnableDefaultCompileItems", "true").lower() != "false":
        files = {p for p in folder.rglob("*.cs") if not {"bin", "obj"} & set(p.relative_to(folder).parts)}
    for item in root.iter("Compile"):
        if "Include" in item.attrib:
            files |= set(folder.glob(item.attrib["Include"].replace("\\", "/")))
        if "Remove" in item.attrib:
            files -= set(folder.glob(item.attrib["Remove"].replace("\\", "/")))
    return {str(p.relative_to(HOST)) for p in files}


def _hosting_files() -> set[str]:
    return {str(p.relative_to(HOST)) for p in (HOST / "lib" / "Hosting").rglob("*.cs")}


def test_the_library_project_compiles_what_build_sh_compiles_and_the_sdk_only_hosting_files():
    _, built = _build_sh()
    assert _sdk_sources(LIBRARY) == built["library"] | _hosting_files()
    assert not built["library"] & _hosting_files()


def test_the_app_project_compiles_what_build_sh_compiles():
    _, built = _build_sh()
    assert _sdk_sources(APP) == built["app"]


def test_both_projects_use_build_sh_language_version_unsafe_code_and_defines():
    flags, _ = _build_sh()
    language = next(f.split(":", 1)[1] for f in flags if f.startswith("-langversion:"))
    script = (HOST / "build.sh").read_text()
    defines = sorted(set(re.findall(r"-(?:define|d):(\S+)", script)))
    for project in (LIBRARY, APP):
        properties = _properties(project)
        assert properties.get("LangVersion") == language, project
        assert (properties.get("AllowUnsafeBlocks", "false").lower() == "true") == ("-unsafe" in flags), project
        assert sorted(d for d in properties.get("DefineConstants", "").replace(",", ";").split(";") if d) == defines


def test_every_hosting_file_is_named_in_the_readme_as_sdk_only():
    paragraphs = README.read_text().split("\n\n")
    for path in _hosting_files():
        name = Path(path).name
        assert any(name in paragraph and "SDK-only" in paragraph for paragraph in paragraphs), name
