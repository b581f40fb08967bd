"""One run end to end, and the commands that read a finished run.

job (config -> summary, the part every app shares) -> round_loop (rounds, sampling,
evaluation cadence, ε per round) with checkpoints, metrics_log and round_summary (bytes,
participation); vertical_rounds is the same loop for the split model. runs (registry and
locks), export (SavedModel + model card), reporting (report.md / report.html), predict
(score a CSV with an export) and audit (membership inference on an export).
Imports learning/, privacy/ and runtime/; none of them imports this package.
"""
