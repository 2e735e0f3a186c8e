"""WorkflowCatalog: the built-in workflows plus the files in the workflows folder.

User files (JSON or TOML) are read again when the folder changes. A bad file
is reported with its path and reason in `problems` and skipped; it never
stops the worker, and it never hides the built-ins.
"""

from __future__ import annotations

import json
import logging
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from ..api.messages import MAX_REQUEST_DEPTH, check_shape, describe_errors, iso
from ..errors import InvalidRequest, NotFound, Unavailable
from .definition import Workflow

log = logging.getLogger("embedded_worker.workflows")

BUILTIN_DIR = Path(__file__).parent / "builtin"
SUFFIXES = (".json", ".toml")


@dataclass
class CatalogEntry:
    workflow: Workflow
    source: str
    created_at: float
    updated_at: float
    usage_count: int = 0


class WorkflowCatalog:
    def __init__(self, user_dir: Path | None, model_known: Callable[[str], bool]):
        self.user_dir = Path(user_dir) if user_dir else None
        self._model_known = model_known
        self._lock = threading.Lock()  # guards the maps and the folder stamp
        self._builtin = self._read_folder(BUILTIN_DIR, problems=None)
        self._user: dict[str, CatalogEntry] = {}
        self._problems: list[dict] = []
        self._stamp: tuple | None = None
        self.refresh()

    def _read_folder(self, folder: Path, problems: list[dict] | None) -> dict[str, CatalogEntry]:
        entries: dict[str, CatalogEntry] = {}
        for path in sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file()):
            try:
                workflow = read_workflow_file(path)
            except ValueError as error:
                if problems is None:
                    raise
                problems.append({"path": str(path), "reason": str(error)})
                log.warning("workflow file %s skipped: %s", path, error)
                continue
            if workflow.id in entries:
                if problems is not None:
                    problems.append({"path": str(path), "reason": f"duplicate workflow id '{workflow.id}'"})
                continue
            stat = path.stat()
            entries[workflow.id] = CatalogEntry(workflow, str(path), stat.st_mtime, stat.st_mtime)
        return entries

    def refresh(self) -> None:
        """Re-read the user folder if any file in it changed."""
        if self.user_dir is None or not self.user_dir.is_dir():
            return
        try:
            stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in self.user_dir.iterdir()
                                 if p.suffix in SUFFIXES))
        except OSError:  # a file went away while we looked: the next call looks again
            return
        with self._lock:
            if stamp == self._stamp:
                return
        problems: list[dict] = []
        entries = self._read_folder(self.user_dir, problems)
        for workflow_id in list(entries):
            if workflow_id in self._builtin:
                problems.append({"path": entries[workflow_id].source,
                                 "reason": f"workflow id '{workflow_id}' is built in and cannot be replaced"})
                del entries[workflow_id]
        with self._lock:
            for workflow_id, entry in entries.items():
                old = self._user.get(workflow_id)
                if old is not None:
                    entry.usage_count = old.usage_count
            self._user = entries
            self._problems = problems
            self._stamp = stamp

    def _entries(self) -> list[CatalogEntry]:
        with self._lock:
            return [*self._builtin.values(), *self._user.values()]

    def entry(self, workflow_id: str) -> CatalogEntry:
        self.refresh()
        with self._lock:
            entry = self._builtin.get(workflow_id) or self._user.get(workflow_id)
        if entry is None:
            raise NotFound(f"Workflow '{workflow_id}' not found")
        return entry

    def available(self, workflow: Workflow) -> bool:
        return all(self._model_known(model_id) for model_id in workflow.required_models)

    def take_for_run(self, workflow_id: str) -> Workflow:
        """The workflow to execute, counted as used; unavailable ones are refused."""
        entry = self.entry(workflow_id)
        if not self.available(entry.workflow):
            raise Unavailable(f"Workflow '{workflow_id}' is not currently available")
        with self._lock:
            entry.usage_count += 1
        return entry.workflow

    def describe(self, workflow_id: str) -> dict:
        return self._describe(self.entry(workflow_id))

    def describe_all(self) -> list[dict]:
        self.refresh()
        return [self._describe(entry) for entry in self._entries()]

    def problems(self) -> list[dict]:
        self.refresh()
        with self._lock:
            return list(self._problems)

    def _describe(self, entry: CatalogEntry) -> dict:
        workflow = entry.workflow
        return {
            "id": workflow.id,
            "name": workflow.name,
            "description": workflow.description,
            "category": workflow.category,
            "version": workflow.version,
            "steps": [
                {"order": s.order, "domain": s.domain, "operation": s.operation, "description": s.description}
                for s in workflow.steps
            ],
            "parameters": [
                {
                    "name": p.name,
                    "type": p.type,
                    "default": p.default,
                    "minimum": p.minimum,
                    "maximum": p.maximum,
                    "description": p.description,
                    "required": p.required,
                    "choices": p.choices,
                }
                for p in workflow.parameters
            ],
            "required_models": list(workflow.required_models),
            "estimated_duration": workflow.estimated_duration,
            "is_available": self.available(workflow),
            "usage_count": entry.usage_count,
            "created_at": iso(entry.created_at),
            "updated_at": iso(entry.updated_at),
            "source": "builtin" if entry.source.startswith(str(BUILTIN_DIR)) else entry.source,
        }


def read_workflow_file(path: Path) -> Workflow:
    """Parse and validate one file; ValueError with the reason when it is not a workflow."""
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        check_shape(data)  # nesting a request may not have, a file may not have either
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot parse: {error}") from None
    except RecursionError:
        raise ValueError(f"cannot parse: nested deeper than {MAX_REQUEST_DEPTH} levels") from None
    except InvalidRequest as error:
        raise ValueError(error.message) from None
    try:
        return Workflow.model_validate(data)
    except ValidationError as error:
        raise ValueError(describe_errors(error)[0]) from None
