"""Pipelines: the example pipeline end to end, then again with nothing changed.

A real `keel up` (SQLite) in its own process; `keel pipeline run` as a user runs
it. Reports wall time of: a first run (validate → train 300 epochs → evaluate →
register), a rerun where every step is skipped (content hashes), and a rerun
after a dataset change.

    python bench/pipelines.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import keel_server, table

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipeline"


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d) / "ex"
        shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("__pycache__"))
        # The server and the CLI share one store: the same database and artifact root.
        shared = (
            f"database_url: sqlite:///{Path(d) / 'keel.db'}\n"
            f"data: {{artifact_root: {Path(d) / 'artifacts'}}}\nlocal: {{enabled: false}}\n"
        )
        cfg = Path(d) / "keel.yaml"
        cfg.write_text(shared + f"data_dir: {Path(d) / 'cli'}\n")
        with keel_server(shared) as (port, _pid):
            env = {**os.environ, "KEEL_URL": f"http://127.0.0.1:{port}"}
            argv = [sys.executable, "-m", "keel.cli", "pipeline", "run", "pipeline.yaml",
                    "--config", str(cfg)]  # fmt: skip
            rows = []
            for label in ("first run", "unchanged (all skipped)", "dataset changed"):
                if label == "dataset changed":
                    with (work / "data" / "intents.jsonl").open("a") as f:
                        f.write('{"input": "hiya", "expected": "greeting", "split": "train"}\n')
                t0 = time.perf_counter()
                p = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
                dt = time.perf_counter() - t0
                if p.returncode != 0:
                    sys.exit(f"{label}: failed\n{p.stdout}\n{p.stderr}")
                rows.append([label, f"{dt:.2f}", p.stdout.count(" skipped: ")])
    print(table(["pipeline run", "wall s", "steps skipped"], rows))


if __name__ == "__main__":
    main()
