"""Differential privacy as accounted, without TensorFlow.

dp_config (the [privacy] section, the sampling the program performs), dp_events (the
dp_accounting events of the mechanisms as run), accounting (ε from those events),
calibration (noise for a target ε, the job's PrivacyPlan), statement (the privacy
statement), secure_settings (what secure aggregation clips, rounds and reveals), ledger
(ε spent on a data source across runs) and private_run (one run's plan, spend and ledger
booking). Importing any of it loads no TensorFlow (tests/tff_apps/privacy checks it); the
TFF aggregators that add the noise are in learning/dp_aggregators.py.
"""
