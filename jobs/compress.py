"""`ray job submit --working-dir . -- python jobs/compress.py checkpoint=PATH out=PATH [overrides]`: the
`raytrain compress` command as a Ray job entry point. Inside a submitted job RAY_ADDRESS is set, so the row ranges
are spread over the cluster; `checkpoint` and `out` must be on storage the driver can read and write."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when raytrain isn't installed

from raytrain.cli import run_command  # noqa: E402
from raytrain.commands import compress  # noqa: E402

if __name__ == "__main__":
    run_command(compress, "jobs/compress.py", sys.argv[1:])
