"""`gsjax demo`: SFT then agentic GRPO on a tiny Qwen3-VL, offline on a CPU, resumable (see pipeline.py)."""
