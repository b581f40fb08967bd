"""One JSON line per round in metrics.jsonl, mirrored to TensorBoard; the keys a DP run
must not release (the per-round client lists) in the operator-only `operator/rounds.jsonl`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import tensorflow as tf

from shared.files import write_text_atomic


OPERATOR_DIR = "operator"
OPERATOR_ROUNDS = f"{OPERATOR_DIR}/rounds.jsonl"


class MetricsLog:
    """Appends one JSON line per round and mirrors numbers to TensorBoard.

    `operator_only`: keys of a round's record that go to `operator/rounds.jsonl` (with the
    round number) instead of metrics.jsonl and TensorBoard; `keep_rounds_up_to` joins them
    back into the records it returns.
    """

    def __init__(self, run_dir: Path, operator_only: tuple[str, ...] = ()):
        self.path = run_dir / "metrics.jsonl"
        self.operator_path = run_dir / OPERATOR_ROUNDS
        self.operator_only = operator_only
        self.events_dir = run_dir / "tensorboard"
        self.writer = tf.summary.create_file_writer(str(self.events_dir))

    def write(self, record: dict[str, Any]) -> None:
        public, private = self._split(record)
        if private:
            self.operator_path.parent.mkdir(exist_ok=True)
            _append_line(self.operator_path, {"round": record["round"], **private})
        _append_line(self.path, public)
        self._write_events(public)

    def _split(self, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        public = {k: v for k, v in record.items() if k not in self.operator_only}
        return public, {k: v for k, v in record.items() if k in self.operator_only}

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
        kept = _rounds_up_to(self.path, last_round)
        write_text_atomic(self.path, "".join(json.dumps(r, default=float) + "\n" for r in kept))
        self._rewrite_events(kept)
        if self.operator_path.exists():
            private = _rounds_up_to(self.operator_path, last_round)
            write_text_atomic(self.operator_path, "".join(json.dumps(r) + "\n" for r in private))
            by_round = {r["round"]: r for r in private}
            kept = [{**record, **by_round.get(record["round"], {})} for record in kept]
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


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record, default=float) + "\n")


def _rounds_up_to(path: Path, last_round: int) -> list[dict[str, Any]]:
    """The records of rounds <= `last_round`; a line cut short by a kill is dropped."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] <= last_round:
            kept.append(record)
    return kept
