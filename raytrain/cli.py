"""`raytrain <command> [hydra overrides]`: the one entry point.

Each command is a module in `raytrain/commands/` exposing `CONFIG_NAME` (its primary config in `conf/`), `HELP`
(one line) and `run(cfg)`; adding a command is adding such a file. A module `<command>_<sub>.py` is also reachable as
`raytrain <command> <sub>` (e.g. `raytrain autolabel eval`). Hydra composes the config, so overrides,
`--cfg job`, `--help` and misspelt-key errors behave as in any Hydra app. User errors (`RaytrainError`) end with
one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

import raytrain.commands

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def commands() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(raytrain.commands.__path__):
        found[info.name.replace("_", "-")] = importlib.import_module(f"raytrain.commands.{info.name}")
    return found


def usage(available: dict[str, ModuleType]) -> str:
    lines = ["usage: raytrain <command> [key=value ...] [--cfg job] [--help]", "", "commands:"]
    lines += [f"  {name:<12} {mod.HELP}" for name, mod in sorted(available.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    available = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(available))
        return
    name, overrides = argv[0], argv[1:]
    if overrides and f"{name}-{overrides[0]}" in available:  # `raytrain autolabel eval` = `raytrain autolabel-eval`
        name, overrides = f"{name}-{overrides[0]}", overrides[1:]
    if name not in available:
        print(f"raytrain: unknown command {name!r}\n\n{usage(available)}", file=sys.stderr)
        sys.exit(2)
    run_command(available[name], f"raytrain {name}", overrides)


def run_command(command: ModuleType, prog: str, overrides: list[str]) -> None:
    """Compose `command.CONFIG_NAME` with Hydra from `overrides` and call `command.run`."""
    import hydra

    from raytrain.config import RaytrainError

    def task(cfg: object) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
        try:
            command.run(cfg)
        except RaytrainError as e:
            print(f"raytrain: error: {e}", file=sys.stderr)
            sys.exit(2)

    sys.argv = [prog, *overrides]
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=command.CONFIG_NAME)(task)()
