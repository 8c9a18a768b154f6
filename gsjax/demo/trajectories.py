"""Built-in agent trajectories for the demo's SFT stage, and the demo's RL tasks.

A tiny model only learns the tool protocol from examples that are exactly what the agent loop produces,
so nothing here writes protocol text by hand; and it learns in a few minutes only what it can predict, so
the turns are short and formulaic (the subject's name, the tool's arguments, the picked image id) rather
than copying facts out of long observations: a scripted policy (search -> [browse] -> image_search ->
answer, each turn reading the previous observation) plays real episodes through `run_episode` against
the offline corpus tools, and each finished episode becomes one ShareGPT record (`messages` + `images`,
images before the text of their turn, as every gsjax path renders them).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsjax.agent.config import AgentConfig, ToolsConfig
from gsjax.agent.loop import EpisodeResult, Task, run_episode
from gsjax.agent.policy import Message, PolicyReply
from gsjax.agent.protocol import format_answer, format_tool_call
from gsjax.agent.tools import open_toolset
from gsjax.agent.tools.local import BUILTIN_CORPUS
from gsjax.fileio import atomic_write_text

DEMO_DATE = "2025-06-01"  # pinned, so SFT records and GRPO rollouts show the policy the same system text
IMAGE_PLACEHOLDER = "<image>"

# (prompt template, plan): "short" = search, image_search, answer; "browse" adds a browse after the search.
# Six wordings, so that copying the request's style into the answer fits them better than a few styles by
# heart (measured: no clear change in GRPO answer rates, see pipeline.sft_config).
SFT_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Create a photorealistic poster of the {name} at golden hour, true to its real appearance.", "short"),
    ("Generate a museum-catalogue photo of the {name}, accurate in shape, colour and materials.", "browse"),
    ("Draw a travel-magazine cover featuring the {name}, with one real fact about it in the caption.", "short"),
    ("Paint a watercolour of the {name} that an expert would recognise at once.", "short"),
    ("Produce a children's-book illustration of the {name}, keeping its true proportions.", "browse"),
    ("Render a night-time photograph of the {name} with its real colours.", "short"),
)
RL_TEMPLATE = "Make a postcard image of the {name} that gets its real-world look right."

_HIT_RE = re.compile(r"^\[(?P<title>[^\]]*)\]\((?P<url>[^)]*)\) (?P<snippet>.*)$", re.MULTILINE)
_IMG_RE = re.compile(r"^(?P<id>IMG_\d{3,}): title: (?P<title>.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Subject:
    """One visual subject of the corpus: its name, the search phrase and its picture (the RL ground truth)."""

    key: str
    name: str
    image: Path


@dataclass(frozen=True)
class DemoTask:
    task_id: str
    prompt: str
    subject: Subject
    plan: str = "short"


def corpus_subjects(corpus: Path = BUILTIN_CORPUS) -> list[Subject]:
    """Every captioned corpus image is a subject (its title is the name the agent searches for)."""
    subjects = []
    for line in (corpus / "images.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            name = re.sub(r"^(Study after|Illustration of|The)\s+", "", row["title"]).removesuffix(" in Paris")
            subjects.append(Subject(Path(row["file"]).stem, name, corpus / "images" / row["file"]))
    return subjects


def sft_tasks(subjects: Sequence[Subject], limit: int | None = None) -> list[DemoTask]:
    """Every (template, subject) pair, interleaved so that a prefix still covers every template."""
    tasks = [DemoTask(f"sft-{s.key}-{t}", template.format(name=s.name), s, plan)
             for t, (template, plan) in enumerate(SFT_TEMPLATES) for s in subjects]
    tasks.sort(key=lambda task: (subjects.index(task.subject), task.task_id))
    return tasks[:limit] if limit is not None else tasks


def rl_tasks(subjects: Sequence[Subject]) -> list[DemoTask]:
    """One held-out prompt wording per subject; the subject's corpus picture is the ground truth."""
    return [DemoTask(f"rl-{s.key}", RL_TEMPLATE.format(name=s.name), s) for s in subjects]


# --------------------------------------------------------------------------- the scripted policy


class ScriptedPolicy:
    """Plays one `DemoTask` by its plan; every turn is decided from what the tools actually returned."""

    def __init__(self, task: DemoTask):
        self.task = task
        self.steps = ["search", *(["browse"] if task.plan == "browse" else []), "image_search", "answer"]

    async def complete(self, messages: Sequence[Message], max_tokens: int) -> PolicyReply:
        done = sum(1 for m in messages if m.role == "assistant")
        step = self.steps[min(done, len(self.steps) - 1)]
        last = messages[-1].text if messages else ""
        text = getattr(self, f"_{step}")(last, messages)
        return PolicyReply(text=text, finish_reason="stop")

    @property
    def name(self) -> str:
        return self.task.subject.name

    def _search(self, last: str, messages: Sequence[Message]) -> str:
        think = f"I need facts about the {self.name} first."
        return format_tool_call("search", {"queries": [f"{self.name} facts"], "top_k": 2}, think=think)

    def _browse(self, last: str, messages: Sequence[Message]) -> str:
        hit = _HIT_RE.search(last)
        url = hit.group("url") if hit else ""
        think = f"I will read the {self.name} page."
        return format_tool_call("browse", {"url": url, "query": f"appearance of the {self.name}"}, think=think)

    def _image_search(self, last: str, messages: Sequence[Message]) -> str:
        think = f"Now I need a reference image of the {self.name}."
        return format_tool_call("image_search", {"query": self.name, "top_k": 2}, think=think)

    def _answer(self, last: str, messages: Sequence[Message]) -> str:
        found = [(m.group("id"), m.group("title")) for m in _IMG_RE.finditer(last)]
        words = set(self.name.lower().split())
        found.sort(key=lambda item: -len(words & set(item[1].lower().split())))
        style = self.task.prompt.split(" of the ")[0].split(" featuring the ")[0]
        if not found:
            think = f"No image of the {self.name} came back."
            return format_answer(f"{style} of the {self.name}.", [], think=think)
        img_id = found[0][0]
        think = f"{img_id} shows the {self.name}."
        prompt = f"{style} of the {self.name}, matching the reference image for its shape and colours."
        return format_answer(prompt, [{"img_id": img_id, "note": f"shape and colours of the {self.name}"}],
                             think=think)


# --------------------------------------------------------------------------- episodes -> records


def demo_agent_config(**overrides: Any) -> AgentConfig:
    """Budgets and image sizes shared by the SFT episodes and the GRPO rollouts, so the policy sees the same
    system prompt (tool budget, reference count, date) and the same image grids in both: one 256x256 view
    per image (64 tokens), few rounds. The compact system prompt (318 tokens instead of 1,240) makes every
    SFT sequence and rollout ~900 tokens shorter: the prompt was 60 % of each record."""
    values: dict[str, Any] = dict(max_llm_calls=5, max_reference_images=2, image_max_pixels=256 * 256,
                                  image_min_pixels=256 * 256, date=DEMO_DATE, system_prompt="compact")
    return AgentConfig(**{**values, **overrides})


def demo_tools_config(corpus: Path | None = None) -> ToolsConfig:
    """The offline corpus tools with the default limits (they are quoted in the system prompt); the
    scripted calls ask for two hits each, which keeps observations short."""
    return ToolsConfig(backend="local", local_corpus_dir=str(corpus) if corpus else "")


def episode_record(result: EpisodeResult, data_root: Path) -> dict[str, Any]:
    """An episode as one ShareGPT record; its images are copied under `data_root/images/`."""
    messages, images = [], []
    for message in result.messages:
        content = message.text
        if message.images:
            for part in message.images:
                target = data_root / "images" / f"{part.sha256}.jpg"
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(part.path, target)
                images.append(f"images/{target.name}")
            content = IMAGE_PLACEHOLDER * len(message.images) + content
        messages.append({"role": message.role, "content": content})
    return {"id": result.task_id, "messages": messages, "images": images, "termination": result.termination}


async def play_episodes(tasks: Sequence[DemoTask], agent_cfg: AgentConfig, tools_cfg: ToolsConfig,
                        out_dir: Path) -> list[EpisodeResult]:
    """Run each task's scripted episode (sequentially: the corpus tools are CPU-bound anyway)."""
    results = []
    async with open_toolset(tools_cfg) as tools:
        for task in tasks:
            results.append(await run_episode(Task(prompt=task.prompt, task_id=task.task_id), ScriptedPolicy(task),
                                             tools, agent_cfg, out_dir))
    return results


@dataclass(frozen=True)
class TrajectorySet:
    path: Path  # the ShareGPT JSONL file
    records: int
    images: int


def write_sft_trajectories(root: Path, agent_cfg: AgentConfig, tools_cfg: ToolsConfig,
                           limit: int | None = None) -> TrajectorySet:
    """Play the SFT tasks and write `root/sft.jsonl` (+ `root/images/`); episodes stay in `root/episodes/`."""
    root = Path(root)
    tasks = sft_tasks(corpus_subjects(Path(tools_cfg.local_corpus_dir or BUILTIN_CORPUS)), limit)
    results = asyncio.run(play_episodes(tasks, agent_cfg, tools_cfg, root / "episodes"))
    bad = [r.task_id for r in results if r.termination != "answer"]
    if bad:
        raise RuntimeError(f"scripted episodes did not end with an answer: {bad}")
    records = [episode_record(r, root) for r in results]
    path = root / "sft.jsonl"
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return TrajectorySet(path, len(records), sum(len(r["images"]) for r in records))


def write_rl_tasks(root: Path, corpus: Path | None = None) -> Path:
    """`root/rl_tasks.json`: `[{id, prompt, gt_image}]` (spec training_and_eval.md), ground truths copied."""
    root = Path(root)
    rows = []
    for task in rl_tasks(corpus_subjects(corpus or BUILTIN_CORPUS)):
        gt = root / "gt" / task.subject.image.name
        gt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(task.subject.image, gt)
        rows.append({"id": task.task_id, "prompt": task.prompt, "gt_image": str(gt.resolve())})
    path = root / "rl_tasks.json"
    atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1))
    return path
