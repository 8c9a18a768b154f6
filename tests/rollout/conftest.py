"""Fixtures of the rollout tests: tiny random HF Qwen3-VL checkpoints (spec §6 shapes) and the references
the embedded sampler is checked against (the model's own full forward, no cache)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gsjax.models.qwen3_vl import reference as R
from gsjax.models.qwen3_vl.checkpoint import load_hf
from gsjax.models.qwen3_vl.forward import Runner
from gsjax.rollout.engine import GenerationRequest, GenerationResult, ImageInputs, SamplingParams

jax.config.update("jax_default_matmul_precision", "highest")

IMAGE_GRIDS = [(1, 4, 4), (1, 4, 8)]  # 4 and 8 merged tokens
PATCH_DIM = 3 * R.TINY_VISION["temporal_patch_size"] * R.TINY_VISION["patch_size"] ** 2
NEW_GRID = (1, 4, 4)  # one more image (4 merged tokens) in a tool response
IMAGE_ID, VISION_START, VISION_END = 200, 202, 203


@pytest.fixture(scope="session")
def sampler_hf_dirs(tmp_path_factory) -> dict[str, object]:
    """Two dense tiny checkpoints with different weights (the second one for weight updates)."""
    root = tmp_path_factory.mktemp("sampler_hf")
    return {name: R.build_tiny_hf(root / name, seed=seed) for name, seed in (("base", 0), ("other", 7))}


@pytest.fixture(scope="session")
def sampler_model(sampler_hf_dirs):
    return load_hf(sampler_hf_dirs["base"])


@pytest.fixture(scope="session")
def sampler_runner(sampler_model) -> Runner:
    return Runner(sampler_model)


def text_request(length: int, params: SamplingParams, start: int = 5, request_id: str = "") -> GenerationRequest:
    ids = tuple(int(i) for i in (np.arange(length) * 7 + start) % 190)
    return GenerationRequest(input_ids=ids, params=params, request_id=request_id or f"text{length}")


def image_request(params: SamplingParams, seed: int = 0, request_id: str = "image") -> GenerationRequest:
    ids = R.image_prompt(IMAGE_GRIDS, IMAGE_ID, VISION_START, VISION_END)
    pixels = R.random_pixels(IMAGE_GRIDS, PATCH_DIM, seed=seed)
    return GenerationRequest(input_ids=tuple(int(i) for i in ids), params=params, request_id=request_id,
                             images=ImageInputs(pixel_values=pixels, image_grid_thw=np.asarray(IMAGE_GRIDS)))


def reference_logprobs(runner: Runner, requests: list[GenerationRequest], results: list[GenerationResult]
                       ) -> list[np.ndarray]:
    """Per request, log-softmax (T, V) of the full, uncached forward over prompt + output[:-1] at the positions
    that predicted each output token (one right-padded batch; causal, so one pass gives every step)."""
    seqs = [np.asarray(q.input_ids + r.output_ids[:-1]) for q, r in zip(requests, results)]
    width = max(s.size for s in seqs)
    ids = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        ids[i, :s.size], mask[i, :s.size] = s, 1
    arrays: dict = {"input_ids": ids, "attention_mask": mask}
    images = [q.images for q in requests if q.images is not None]
    if images:
        arrays["pixel_values"] = np.concatenate([im.pixel_values for im in images])
        arrays["image_grid_thw"] = np.concatenate([im.image_grid_thw for im in images])
    logits = runner.logits(arrays)
    out = []
    for i, (q, r) in enumerate(zip(requests, results)):
        n = len(q.input_ids)
        rows = logits[i, n - 1:n - 1 + len(r.output_ids)].astype(np.float64)
        out.append(rows - np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1, keepdims=True))
                   - rows.max(-1, keepdims=True))
    return out


def assert_matches_full_forward(runner: Runner, requests, results, greedy_rows: bool = True) -> None:
    """Each output token is the argmax of the uncached forward (greedy rows) and its logprob is that
    forward's log-softmax at the token, to 1e-4 in fp32."""
    for q, r, ref in zip(requests, results, reference_logprobs(runner, requests, results)):
        out = np.asarray(r.output_ids)
        if greedy_rows:
            np.testing.assert_array_equal(ref.argmax(-1), out, err_msg=q.request_id)
        np.testing.assert_allclose(r.logprobs, ref[np.arange(out.size), out], atol=1e-4, err_msg=q.request_id)


def next_turn(request: GenerationRequest, result: GenerationResult, text: tuple[int, ...], with_image: bool = False,
              seed: int = 5) -> GenerationRequest:
    """The agent's next turn: the exact history (prompt + every sampled id), then a tool response."""
    ids = request.input_ids + result.output_ids + text[:2]
    images = request.images
    if with_image:
        ids += (VISION_START,) + (IMAGE_ID,) * 4 + (VISION_END,)
        pixels = R.random_pixels([NEW_GRID], PATCH_DIM, seed=seed)
        old_pixels = np.zeros((0, PATCH_DIM), np.float32) if images is None else images.pixel_values
        old_grids = np.zeros((0, 3), np.int64) if images is None else images.image_grid_thw
        images = ImageInputs(pixel_values=np.concatenate([old_pixels, pixels]),
                             image_grid_thw=np.concatenate([old_grids, np.asarray([NEW_GRID])]))
    return GenerationRequest(ids + text[2:], request.params, images, request.request_id + "+")
