"""One JSON line per round in metrics.jsonl, mirrored to TensorBoard.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import tensorflow as tf

from shared.files import write_text_atomic


class MetricsLog:
    """Appends one JSON line per round and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.events_dir = run_dir / "tensorboard"
        self.writer = tf.summary.create_file_writer(str(self.events_dir))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, default=float) + "\n")
        self._write_events(record)

    def _write_events(self, record: dict[str, Any]) -> None:
        with self.writer.as_default(step=record["round"]):
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "round" and math.isfinite(value):
                    tf.summary.scalar(key, value)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def keep_rounds_up_to(self, last_round: int) -> list[dict[str, Any]]:
        """A resumed run: keeps the lines of rounds <= `last_round` (the checkpoint's), drops
        the later ones (they run again) and a line cut short by a kill; returns those kept."""
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] <= last_round:
                kept.append(record)
        write_text_atomic(self.path, "".join(json.dumps(r, default=float) + "\n" for r in kept))
        self._rewrite_events(kept)
        return kept

    def _rewrite_events(self, kept: list[dict[str, Any]]) -> None:
        """TensorBoard's event files hold what a killed attempt evaluated after the checkpoint
        too (a release of rounds that run again with fresh noise): they are written anew from
        the rounds kept, as metrics.jsonl is."""
        self.writer.close()
        shutil.rmtree(self.events_dir, ignore_errors=True)
        self.writer = tf.summary.create_file_writer(str(self.events_dir))
        for record in kept:
            self._write_events(record)
