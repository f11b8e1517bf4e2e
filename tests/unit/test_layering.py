"""The engine and the models never import the web layer; families never build wire objects."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

from tunnelvision.models.registry import FAMILIES

CHECK = """
import sys
import tunnelvision.engine.engine, tunnelvision.engine.scheduler, tunnelvision.engine.pipeline
import tunnelvision.models.grounded_sam, tunnelvision.models.factory, tunnelvision.models.random
import tunnelvision.jobs.runner, tunnelvision.jobs.store, tunnelvision.client, tunnelvision.batch
web = sorted(m for m in sys.modules if m.split('.')[0] in {'fastapi', 'starlette', 'uvicorn'}
             or m.startswith('tunnelvision.api'))
print(','.join(web))
"""
WIRE_CLASSES = {"Detection", "Segmentation", "RLE", "DetectResponse", "SegmentResponse"}


def test_engine_and_models_import_nothing_from_the_web_stack() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def imported_names(path: Path) -> set[str]:
    """Every `module.name` a source file imports (and bare `module` for `import module`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_families_answer_in_arrays_and_never_build_wire_objects() -> None:
    modules = {f"tunnelvision.models.{ref.module}" for ref in FAMILIES.values()} | {
        "tunnelvision.models.roles"
    }
    for module in sorted(modules):
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None
        names = imported_names(Path(spec.origin))
        wire = {
            n for n in names if n.startswith("tunnelvision.schemas.") and n.split(".")[-1] in WIRE_CLASSES
        }
        assert not wire, f"{module} imports wire classes {sorted(wire)}: results.py turns arrays into those"
        assert "tunnelvision.schemas" not in names and "tunnelvision.masks.encode_mask" not in names


# What a base install (`pip install tunnelvision`, no extras) imports: the client, `tunnelvision
# predict` and its COCO/drawing helpers, the CLI itself, the CVAT function. None may need the server.
CLIENT_MODULES = (
    "tunnelvision",
    "tunnelvision.client",
    "tunnelvision.batch",
    "tunnelvision.coco",
    "tunnelvision.masks",
    "tunnelvision.drawing",
    "tunnelvision.imaging",
    "tunnelvision.schemas",
    "tunnelvision.cli",
    "tunnelvision.integrations.supervision",
    "tunnelvision.integrations.cvat",
)
SERVER_PACKAGES = {
    *("torch", "torchvision", "transformers", "safetensors", "scipy"),
    *("fastapi", "starlette", "uvicorn", "jwt", "prometheus_client"),
}
# Modules of optional extras, and the package each needs.
OPTIONAL = {
    "tunnelvision.integrations.cvat": "cvat_sdk",
    "tunnelvision.integrations.supervision": "supervision",
}
# Packages an optional client extra brings itself (supervision depends on scipy).
THEIR_OWN = {"tunnelvision.integrations.supervision": {"scipy"}}
CLIENT_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(",".join(sorted({m.split('.')[0] for m in sys.modules} & set(%r))))
"""


def test_the_client_modules_import_nothing_from_the_server() -> None:
    """The light client (and the masks it decodes) must install and import without the server's
    packages; the base-install e2e test proves it on a real install, this says which import broke."""
    probe = CLIENT_PROBE % sorted(SERVER_PACKAGES)
    for module in CLIENT_MODULES:  # one interpreter each: one module's imports cannot hide another's
        if module in OPTIONAL and importlib.util.find_spec(OPTIONAL[module]) is None:
            continue  # its extra is not installed here (cvat-sdk needs Python >= 3.11)
        done = subprocess.run(
            [sys.executable, "-c", probe, module], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        imported = set(filter(None, done.stdout.strip().split(","))) - THEIR_OWN.get(module, set())
        assert not imported, f"{module} imports {sorted(imported)}"
