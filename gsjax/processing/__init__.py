"""Qwen3-VL input processing in small one-job modules; `gsjax.processor` is the public face."""
