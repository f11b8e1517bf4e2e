"""The engine and the models never import the web layer."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import tunnelvision.engine.engine, tunnelvision.engine.scheduler
import tunnelvision.models.grounded_sam, tunnelvision.models.factory, tunnelvision.models.random
import tunnelvision.jobs.runner, tunnelvision.jobs.store, tunnelvision.client, tunnelvision.batch
web = sorted(m for m in sys.modules if m.split('.')[0] in {'fastapi', 'starlette', 'uvicorn'}
             or m.startswith('tunnelvision.api'))
print(','.join(web))
"""


def test_engine_and_models_import_nothing_from_the_web_stack() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
