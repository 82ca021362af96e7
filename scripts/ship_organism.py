"""Install a finished `sightline organism train` run as the shipped organism, with its eval.json.

    python scripts/ship_organism.py RUN_DIR [--heldout-n 200]

Scores the run's model on the card's two fixed batches (the test batch that
tests/test_organism.py re-scores: seed 1, n 40; the held-out figures of docs/organism.md: seed 2),
writes them with the training config and log figures into eval.json next to the weights, and
replaces src/sightline/organism/checkpoint/ in one rename. Update docs/organism.md by hand from the
printed figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from sightline.models import load_model
from sightline.organism.evaluate import evaluate

DEST = Path(__file__).resolve().parents[1] / "src" / "sightline" / "organism" / "checkpoint"


def first(log: list[dict], key: str):
    return next((e[key] for e in log if key in e), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="the --out folder of a finished `sightline organism train`")
    ap.add_argument("--heldout-n", type=int, default=200)
    a = ap.parse_args()
    if not (a.run / "model" / "config.json").exists() or not (a.run / "train_log.json").exists():
        raise SystemExit(f"{a.run} holds no finished run (model/ and train_log.json): finish training first")
    adapter = load_model(str(a.run / "model"))
    t = time.time()
    test = evaluate(adapter, seed=1, n=40, progress=False)
    held = evaluate(adapter, seed=2, n=a.heldout_n, progress=True)
    log = json.loads((a.run / "train_log.json").read_text())
    entries = log["log"]
    card = {"test_batch": {k: test[k] for k in ("seed", "n", "accuracy", "count")},
            "heldout": {k: held[k] for k in ("seed", "n", "accuracy", "count", "examples")},
            "train": {"config": log["config"],
                      "stage1_heldout": first(entries, "stage1_heldout"),
                      "final_vision_heldout": first(entries, "final_vision_heldout"),
                      "final_loss_ema": [e for e in entries if "loss_ema" in e][-1]["loss_ema"],
                      "seconds": [e for e in entries if "seconds" in e][-1]["seconds"]}}
    tmp = DEST.with_name("checkpoint.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(a.run / "model", tmp)
    (tmp / "eval.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(DEST, ignore_errors=True)
    tmp.rename(DEST)
    print(json.dumps({"test": test["accuracy"], "heldout": held["accuracy"], "train": card["train"] | {"config": "..."},
                      "eval_seconds": round(time.time() - t)}, indent=1))


if __name__ == "__main__":
    main()
