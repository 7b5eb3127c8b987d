"""`ray job submit --working-dir . -- python jobs/pretrain.py [overrides]`: the `raytrain train` job as a Ray job
entry point. Inside a submitted job RAY_ADDRESS is set, so the run joins the cluster instead of starting one."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when raytrain isn't installed

from raytrain.cli import run_command  # noqa: E402
from raytrain.commands import train  # noqa: E402

if __name__ == "__main__":
    run_command(train, "jobs/pretrain.py", sys.argv[1:])
