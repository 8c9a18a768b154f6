"""FLOPs per token for MFU (spec/qwen3vl.md §7): matmul parameters touched per token, plus attention."""

from __future__ import annotations

from .config import Qwen3VLConfig


def text_matmul_params(config: Qwen3VLConfig) -> int:
    """N: q/k/v/o, the MLP (or the active experts + router) and lm_head per token; no embedding gather,
    no norms. Tied models still pay the lm_head matmul."""
    t = config.text
    q_width, kv_width = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    attn = 2 * t.hidden_size * q_width + 2 * t.hidden_size * kv_width
    total = t.hidden_size * t.vocab_size
    for layer in range(t.num_hidden_layers):
        if t.is_moe_layer(layer):
            mlp = t.num_experts_per_tok * 3 * t.hidden_size * t.moe_intermediate_size + t.hidden_size * t.num_experts
        else:
            mlp = 3 * t.hidden_size * t.intermediate_size
        total += attn + mlp
    return total


def train_flops_per_token(config: Qwen3VLConfig, seq_len: int, causal: bool = True) -> float:
    """6N + A(S), A = 6·L·d_attn·S (causal) or 12·L·d_attn·S (full). Forward only is a third of this."""
    t = config.text
    attn = (6 if causal else 12) * t.num_hidden_layers * t.num_attention_heads * t.head_dim * seq_len
    return 6.0 * text_matmul_params(config) + attn


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    return tokens_per_second * flops_per_token / peak_flops
