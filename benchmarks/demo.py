"""The full `raygen demo`, measured: wall time from nothing (a fresh data folder, Ray's start
included) and what the demo's report says of the models it made, against issue 11's targets.

    python -m benchmarks.demo                  # the full demo: ~13 min on 2 cores
    python -m benchmarks.demo --quick          # the smoke sizes, to try the benchmark itself

JSON goes to ``--out`` (default ``benchmarks/results/demo.json``); a summary is printed.
The demo runs as a user runs it: ``raygen demo --data-dir DIR`` in a subprocess; its data
folder (report, grids, runs) is kept for a look.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.demo import STATE_FILE

REPO = Path(__file__).parents[1]
WALL_TARGET_S = 15 * 60


def run(quick: bool, data: Path) -> dict:
    command = [sys.executable, "-m", "flows.cli", "demo", "--data-dir", str(data)]
    command += ["--quick"] if quick else []
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    if finished.returncode != 0:
        sys.exit(f"raygen demo failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    state = json.loads((data / STATE_FILE).read_text())
    following = {
        name: state["steps"][f"evaluate {name}"]["metrics"]["prompt_following"]
        for name in ("teacher", "student")
    }
    return {
        "command": "raygen demo" + (" --quick" if quick else ""),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "wall_s": round(wall_s, 1),
        "wall_target_s": WALL_TARGET_S,
        "step_seconds": {name: step["seconds"] for name, step in state["steps"].items()},
        "sizes": state["sizes"],
        "prompt_following": following,
        "targets": {**state["targets"], f"wall <= {WALL_TARGET_S} s": wall_s <= WALL_TARGET_S},
        "console_tail": finished.stdout.splitlines()[-6:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo's smoke sizes")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo.json"))
    parser.add_argument(
        "--data-dir", help="the demo's data folder, kept (default: a new temporary one, kept)"
    )
    args = parser.parse_args()
    data = Path(args.data_dir or tempfile.mkdtemp(prefix="raygen-demo-")) / "raygen-data"
    result = run(args.quick, data)
    result["data_dir"] = str(data)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, f in result["prompt_following"].items():
        print(
            f"{name}: color {f['color']:.3f}, shape {f['shape']:.3f}, place {f['place']:.3f} "
            f"({f['images']} images)"
        )
    print(f"wall {result['wall_s']:.0f} s; targets: {result['targets']}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
