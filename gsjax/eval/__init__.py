"""Evaluation: KnowGen (run -> generate -> judge -> K-Score) and WISE (WiScore), every stage
resumable. The CLI lives in `gsjax.eval.cli.eval_app` (mounted as `gsjax eval`)."""
