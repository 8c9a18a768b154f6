"""Rollout engines: token ids (+ images) in, token ids + logprobs out, with a weight version."""
