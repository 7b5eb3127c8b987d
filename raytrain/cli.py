"""`raytrain <command> [hydra overrides]`: the one entry point.

Each command is a module in `raytrain/commands/` exposing `CONFIG_NAME` (its primary config in `conf/`), `HELP`
(one line) and `run(cfg)`; adding a command is adding such a file. A module `<command>_<sub>.py` is also reachable as
`raytrain <command> <sub>` (e.g. `raytrain autolabel eval`). Hydra composes the config, so overrides,
`--cfg job`, `--help` and misspelt-key errors behave as in any Hydra app. A command that wraps another command
line (`submit`) exposes `main(argv)` instead of `run` and parses its own arguments. User errors (`RaytrainError`)
end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import raytrain.commands

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/-]*=")


def commands() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(raytrain.commands.__path__):
        found[info.name.replace("_", "-")] = importlib.import_module(f"raytrain.commands.{info.name}")
    return found


def usage(available: dict[str, ModuleType]) -> str:
    lines = ["usage: raytrain <command> [key=value ...] [--cfg job] [--help]", "", "commands:"]
    width = max(map(len, available))
    lines += [f"  {name:<{width}}  {mod.HELP}" for name, mod in sorted(available.items())]
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
    command = available[name]
    positional = getattr(command, "POSITIONAL", None)
    if positional:
        overrides = positional_override(positional, overrides)
    if hasattr(command, "main"):
        reporting_errors(command.main, overrides)
    else:
        run_command(command, f"raytrain {name}", overrides)


def positional_override(key: str, args: list[str]) -> list[str]:
    """Leading arguments that are not `key=value` overrides (or flags) become one quoted `key='...'` override, so
    free text such as a caption reaches the command verbatim."""
    n = 0
    while n < len(args) and not _OVERRIDE.match(args[n]) and not args[n].startswith("-"):
        n += 1
    if n == 0:
        return args
    text = " ".join(args[:n]).replace("\\", "\\\\").replace("'", "\\'")
    return [f"{key}='{text}'", *args[n:]]


def run_command(command: ModuleType, prog: str, overrides: list[str]) -> None:
    """Compose `command.CONFIG_NAME` with Hydra from `overrides` and call `command.run`."""
    import hydra

    sys.argv = [prog, *overrides]
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=command.CONFIG_NAME)(
        lambda cfg: reporting_errors(command.run, cfg))()


def reporting_errors(fn: Callable[..., Any], *args: Any) -> None:
    """Call `fn` with logging to stderr; a `RaytrainError` ends the process with one line and status 2."""
    from raytrain.config import RaytrainError

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    try:
        fn(*args)
    except RaytrainError as e:
        print(f"raytrain: error: {e}", file=sys.stderr)
        sys.exit(2)


def compose(config_name: str, overrides: list[str]) -> Any:
    """The composed config `raytrain <command> overrides` would run with, without running it (Hydra's own
    composition errors become a `ConfigError` naming the override)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from raytrain.config import ConfigError

    try:
        if GlobalHydra.instance().is_initialized():  # inside a command run by `run_command`: same config dir
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(error: BaseException) -> str:
    """Hydra's multi-line composition error as one line: the message, the options of a missing group choice,
    and the root cause of a failed override."""
    message, _, rest = str(error).strip().partition("\n")
    options = rest.split("Config search path:")[0].split("Available options in")
    if len(options) > 1:
        message += " (options: " + ", ".join(options[1].split()[1:]) + ")"
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause).strip():
        message = f"{message.rstrip('.')}: {str(cause).strip().splitlines()[0]}"
    return message
