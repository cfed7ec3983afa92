"""The prompt modules are pure: importing them loads none of the heavy or I/O packages."""

from __future__ import annotations

import subprocess
import sys


def test_no_heavy_imports() -> None:
    code = (
        "import sys, model_server.prompt, model_server.tasks, model_server.neutralize\n"
        "bad = [m for m in ('torch', 'transformers', 'discord', 'sqlalchemy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
