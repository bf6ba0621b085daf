"""CPU cost of starting the ``beyondfacial`` command: user + system CPU seconds per command.

Each command runs in a fresh subprocess, as a user types it; its CPU time is the growth of
``resource.getrusage(RUSAGE_CHILDREN)`` across the run, so every process it starts counts
too. CPU seconds, unlike wall time, hardly depend on what else the machine is doing.

    python -m benchmarks.cli_startup                      # --help, backends, env, and --check
    python -m benchmarks.cli_startup --repeat 9 --json cli-startup.json
    python -m benchmarks.cli_startup --command "backends" --command "env"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_COMMANDS = ("--help", "backends", "env", "backends --check", "env --check")


def beyondfacial_command() -> list[str]:
    """The console script of this interpreter's environment, else ``python -m bf_core.cli``."""
    script = Path(sys.executable).parent / "beyondfacial"
    if script.is_file():
        return [str(script)]
    found = shutil.which("beyondfacial")
    return [found] if found else [sys.executable, "-m", "bf_core.cli"]


def cpu_seconds(argv: list[str]) -> tuple[float, int]:
    """User + system CPU seconds of one run of ``argv`` (and its children), and its exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return used, result.returncode


def measure(command: str, repeat: int, base: list[str]) -> dict:
    argv = base + shlex.split(command)
    cpu_seconds(argv)  # once untimed: the first run also fills the page cache
    runs, codes = [], set()
    for _ in range(repeat):
        used, code = cpu_seconds(argv)
        runs.append(used)
        codes.add(code)
    return {"command": f"beyondfacial {command}", "median_cpu_s": round(statistics.median(runs), 3),
            "min_cpu_s": round(min(runs), 3), "max_cpu_s": round(max(runs), 3),
            "runs": repeat, "exit_status": sorted(codes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_startup",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", action="append", metavar="ARGS",
                        help="arguments of one beyondfacial command (repeatable); default: "
                             + ", ".join(repr(c) for c in DEFAULT_COMMANDS))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per command")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    base = beyondfacial_command()
    rows = [measure(command, args.repeat, base) for command in args.command or DEFAULT_COMMANDS]
    width = max(len(row["command"]) for row in rows)
    print(f"{'command':<{width}}  median CPU s  min     max     exit")
    for row in rows:
        print(f"{row['command']:<{width}}  {row['median_cpu_s']:>12.2f}  {row['min_cpu_s']:<6.2f}  "
              f"{row['max_cpu_s']:<6.2f}  {','.join(map(str, row['exit_status']))}")
    if args.json:
        info = {"python": platform.python_version(), "platform": platform.platform(),
                "cpus": os.cpu_count(), "results": rows}
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    failed = [row["command"] for row in rows if row["exit_status"] != [0]]
    if failed:
        print(f"failed (non-zero exit status): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
