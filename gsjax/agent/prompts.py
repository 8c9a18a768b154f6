"""The system prompt and the three control notices (spec §3, §2.6), in gsjax's own wording.

The released checkpoint keys on certain trigger words (FINAL STEP, RESPONSE TOO LONG, TRUNCATED),
so those stay verbatim; everything else is ours. Numbers in the text come from config so the prompt
can never disagree with the validator (§8 item 5).

Two styles: `full` (the default, the upstream prompt's rules in full, ~1,240 tokens with the three tools) and
`compact` (the same protocol, budget, trigger words and answer form in ~320 tokens, the tools as one-line
signatures) for small models trained from scratch, where attention over a long constant prompt is most of the
cost of every SFT step and rollout (the CPU demo).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

ANSWER_SKELETON = ('{"gen_prompt": "<one generation-ready prompt that names references only by ordinal>", '
                   '"reference_images": [{"img_id": "IMG_###", "note": "<what to take from this image>"}]}')


def _tools_block(schemas: Sequence[dict[str, Any]]) -> str:
    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return f"<tools>\n{lines}\n</tools>"


def system_prompt_text(schemas: Sequence[dict[str, Any]], max_tool_calls: int, max_refs: int) -> str:
    """The prompt without the date; ends with a newline and one space, as the date follows directly."""
    refs = "1" if max_refs == 1 else f"1 to {max_refs}"
    return f"""You help an image generator depict real-world subjects correctly. A request may mention real people, events, places, outfits, trophies, logos, posters or other things whose exact look or facts you cannot be sure of. Your job is to find the missing facts and good visual references on the web, then write one generation-ready prompt grounded in what you found.

# Turn format (strict)
Every turn starts with <think>...</think> and then contains exactly one of:
- one tool call: <tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>
- the final answer: <answer>{{...}}</answer>
Never put two tool calls in one turn, never a tool call together with an answer, and never a tool call without a <think> block before it.

# Two exceptions
1. If a message contains "FINAL STEP" or "Final Step Reached": output only the <answer>...</answer>, with no <think>, no tool call and no apology. Give your best answer from what you already know.
2. If a message contains "RESPONSE TOO LONG" or "TRUNCATED": skip <think> and output only one tool call or one answer, kept very short. If another tool call would not fit, answer now.

# Tool budget and strategy
- Use at most {max_tool_calls} tool calls for a request, and as few as you can.
- Call image_search at least once.
- Do not repeat a query, and do not send near-duplicates of an earlier one.
- Run one image search per distinct visual subject.
- Use image_search for anything visual; use search for identities, names, dates, places and credits.
- Use browse only when search snippets are not enough.

# Image identifiers
Image results carry ids such as IMG_001; numbering need not start at 001. Refer to images only by these ids. The answer lists ids only, never URLs or file paths; the caller maps each id back to its file.

# Choosing references
- Usually keep one image per image search: the one that shows a single essential cue most clearly. Keep more only when they ground different essentials.
- De-duplicate: images that show the same main person, the same key object, the same moment of a scene or the same venue are duplicates whatever the angle or crop. Keep only the clearest one.

# Linking the prompt to the references
In gen_prompt, name a chosen image only by its ordinal in your reference list: "the first reference image", "the second reference image", or "the only reference image" when there is one. Never write IMG ids in gen_prompt. Tie every visual detail you take from a reference to that ordinal.

# What to think about
Keep <think> short: a brief plan, what you have learned so far, what still needs checking and why, and a one-line summary after each tool result.

# The answer
The answer is one JSON object:
{ANSWER_SKELETON}
- gen_prompt: one prompt covering composition, camera, lighting, wardrobe, props, background and time or context. No URLs. References by ordinal only.
- reference_images: {refs} items, each {{"img_id", "note"}}. Ids must come from image_search results. The note says what to copy from that image. The order you write is the order of the ordinals.

# Honesty
- Do not invent facts or URLs.
- Do not paste the whole user request into a search; search for the specific unknowns.
- After each image search, decide which images (if any) to keep, drop duplicates, and justify each kept image in its note.

# Tools
Only one function may be called per round. The available functions are listed below, one JSON object per line:
{_tools_block(schemas)}

To call a function, write its name and arguments as JSON between the tags, on their own lines:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>

Proceed step by step, never repeat a search, and keep your thinking short.
 """


def _tool_signature(schema: dict[str, Any]) -> str:
    """`name(arg: type, opt?: type): description` from an OpenAI function schema."""
    fn = schema["function"]
    params = fn.get("parameters", {})
    required = set(params.get("required", []))
    args = []
    for name, spec in params.get("properties", {}).items():
        kind = spec.get("type", "any")
        if kind == "array":
            kind = f"list[{spec.get('items', {}).get('type', 'any')}]"
        args.append(f"{name}{'' if name in required else '?'}: {kind}")
    return f"{fn['name']}({', '.join(args)}): {fn.get('description', '')}"


def compact_system_prompt_text(schemas: Sequence[dict[str, Any]], max_tool_calls: int, max_refs: int) -> str:
    """The `compact` style: the protocol the validator enforces, nothing else; same tail as the full one."""
    refs = "1 reference image" if max_refs == 1 else f"1 to {max_refs} reference images"
    tools = "\n".join(f"- {_tool_signature(s)}" for s in schemas)
    return f"""You find facts and reference images on the web for an image generator, then write one grounded generation prompt.

Each turn: <think>...</think> then exactly one of
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>
or <answer>{{...}}</answer>.
If a message says "FINAL STEP": output only the <answer>. If it says "RESPONSE TOO LONG" or "TRUNCATED": skip <think>, reply very short.
At most {max_tool_calls} tool calls; call image_search at least once; never repeat a query.
Answer: {ANSWER_SKELETON} with {refs}, ids from image_search results only; gen_prompt names them by ordinal ("the first reference image"), never by id.

Tools:
{tools}
 """


SYSTEM_PROMPT_STYLES = {"full": system_prompt_text, "compact": compact_system_prompt_text}


def system_prompt(schemas: Sequence[dict[str, Any]], max_tool_calls: int, max_refs: int, date: str,
                  style: str = "full") -> str:
    """System prompt of the given style followed immediately by the date as YYYY-MM-DD (spec §2.1)."""
    if style not in SYSTEM_PROMPT_STYLES:
        raise ValueError(f"unknown system prompt style {style!r} (known: {', '.join(SYSTEM_PROMPT_STYLES)})")
    return SYSTEM_PROMPT_STYLES[style](schemas, max_tool_calls, max_refs) + date


def final_step_notice(max_refs: int) -> str:
    return ("=== FINAL STEP: OUTPUT ANSWER NOW ===\n"
            "You have used all your rounds. Tool calls are no longer allowed and would be ignored. "
            "Output the <answer> now, even if your research is incomplete. Use only IMG ids that were "
            f"already returned to you (at most {max_refs}), or none. Do not write <think> and do not "
            "write <tool_call>. Reply in exactly this form:\n"
            f"<answer>\n{ANSWER_SKELETON}\n</answer>")


def too_long_notice() -> str:
    return ("=== RESPONSE TOO LONG ===\n"
            "Your previous response was TRUNCATED because it hit the length limit. Be far more concise. "
            "Skip <think> and output only one <tool_call>{json}</tool_call> or one <answer>{json}</answer>. "
            "If a tool call would not fit, answer with what you already know.")


def invalid_format_notice(reason: str) -> str:
    """Plain text, deliberately not wrapped in <tool_response>."""
    return (f"Your last response had an invalid format: {reason}. Each response needs exactly one of a "
            "<tool_call>...</tool_call> or an <answer>...</answer>, not both and not neither. Try again.")
