"""`gsjax eval ...`: KnowGen (run | generate | judge | score | compare) and WISE stages.

Mounted by the top-level CLI as `app.add_typer(eval_app, name="eval")`. Every stage resumes:
rerun the same command after a kill and finished samples are skipped.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gsjax.cli_errors import typer_app
from gsjax.eval import knowgen, wise
from gsjax.eval.records import load_benchmark, load_judge_inputs, read_records
from gsjax.rewards.heuristic import HeuristicImageJudge
from gsjax.rewards.image_judge import ImageJudge, ImageJudgeBackend
from gsjax.rewards.judge_client import JudgeClient, JudgeConfig

console = Console(stderr=True)
eval_app = typer_app(help="Evaluate: KnowGen (K-Score) and WISE (WiScore).", no_args_is_help=True)
knowgen_app = typer_app(help="KnowGen: agentic run -> generation -> judge -> K-Score.", no_args_is_help=True)
wise_app = typer_app(help="WISE: run -> generation -> judge -> WiScore.", no_args_is_help=True)
eval_app.add_typer(knowgen_app, name="knowgen")
eval_app.add_typer(wise_app, name="wise")

Out = Annotated[Path, typer.Option("--out", help="Output directory.")]
Workers = Annotated[int, typer.Option(help="Samples processed in parallel.")]
DEFAULT_RUNNER = "gsjax.eval.agent_runner:agent_runner"
RunnerSpec = Annotated[str, typer.Option(
    "--runner", help="'module:factory'; factory(config_path or None) returns an EpisodeRunner. "
    "Default: gsjax's own agent (policy server + search tools).")]
RunnerConfig = Annotated[Path | None, typer.Option(
    "--runner-config", help="Passed to the runner factory; for the default runner a YAML/JSON agent config "
    "(e.g. configs/agent_eval.yaml; API keys from environment variables).")]
GeneratorUrl = Annotated[str, typer.Option("--generator-url", envvar="GSJAX_IMAGEGEN_URL",
                                           help="Image server (POST /generate).")]
GeneratorBackend = Annotated[str, typer.Option("--generator-backend", help="server (gsjax serve-image) | openai "
                                                "(OpenAI-compatible images API at --generator-url)")]
GeneratorModel = Annotated[str, typer.Option("--generator-model", help="Model name for the openai backend.")]
GeneratorKeyEnv = Annotated[str, typer.Option("--generator-api-key-env",
                                              help="Env var holding the openai backend's API key.")]
JudgeUrl = Annotated[str, typer.Option("--judge-base-url", envvar="GEN_REWARD_API_BASE_URL")]
JudgeKeyEnv = Annotated[str, typer.Option("--judge-api-key-env",
                                          help="Environment variable holding the judge API key.")]
JudgeAttempts = Annotated[int, typer.Option("--judge-max-attempts")]
JudgeTimeout = Annotated[float, typer.Option("--judge-timeout")]
JudgeCache = Annotated[Path | None, typer.Option("--judge-cache", help="Directory of cached judge replies.")]


def _has_error(record: dict) -> bool:
    return bool(record.get("error"))


def _not_success(record: dict) -> bool:
    return record.get("success") is not True


def _not_judged(record: dict) -> bool:
    return record.get("eval_success") is not True


class RichStageProgress:
    """StageProgress rendered as a rich bar; counts failures as they land."""

    def __init__(self, label: str, is_failure: Callable[[dict], bool]) -> None:
        self.label, self.is_failure, self.failed = label, is_failure, 0
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("failed {task.fields[failed]}"), TimeRemainingColumn(), console=console)
        self._task = None

    def __enter__(self) -> RichStageProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def start(self, total: int, done: int) -> None:
        self._task = self._bar.add_task(self.label, total=total, completed=done, failed=0)
        if done:
            console.print(f"{self.label}: resuming, {done}/{total} already finished")

    def advance(self, record: dict) -> None:
        self.failed += int(self.is_failure(record))
        self._bar.update(self._task, advance=1, failed=self.failed)


def _fail(exc: Exception) -> NoReturn:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(code=2)


def _load_runner(spec: str, config: Path | None) -> knowgen.EpisodeRunner:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise typer.BadParameter(f"--runner {spec!r}: expected 'module:factory'")
    factory = getattr(importlib.import_module(module_name), attr)
    try:
        return factory(str(config) if config else None)
    except (ValueError, OSError) as exc:  # a bad config or missing key: say so, no traceback
        _fail(exc)


@contextmanager
def _runner_session(runner: knowgen.EpisodeRunner, out: Path) -> Iterator[knowgen.EpisodeRunner]:
    """Optional runner hooks: `set_output_dir(out)` first, then the runner as a context manager
    (open clients once, close them when the stage ends, also on error)."""
    with ExitStack() as stack:
        try:
            if hasattr(runner, "set_output_dir"):
                runner.set_output_dir(out)
            if isinstance(runner, AbstractContextManager):
                stack.enter_context(runner)
        except (ValueError, OSError) as exc:
            _fail(exc)
        yield runner


def _run_agent(items: Sequence, out: Path, spec: str, config: Path | None, workers: int) -> None:
    """The agentic run stage with any runner, progress shown as it goes."""
    with _runner_session(_load_runner(spec, config), out) as runner, RichStageProgress("run", _has_error) as progress:
        path = knowgen.run_stage(items, out, runner, workers=workers, progress=progress)
    console.print(f"wrote {path}")


def _judge_client(base_url: str, model: str, key_env: str, attempts: int, timeout: float,
                  cache: Path | None) -> JudgeClient:
    key = os.environ.get(key_env, "")
    if not key:
        console.print(f"[yellow]warning:[/yellow] ${key_env} is empty; calling the judge without an API key")
    return JudgeClient(JudgeConfig(base_url=base_url, model=model, api_key=key, max_attempts=attempts,
                                   timeout_s=timeout, cache_dir=cache))


# ------------------------------------------------------------------ knowgen


@knowgen_app.command("run")
def knowgen_run(benchmark: Annotated[Path, typer.Option(help="KnowGen JSON/JSONL (§5.3).")], out: Out,
                runner: RunnerSpec = DEFAULT_RUNNER, runner_config: RunnerConfig = None, workers: Workers = 5) -> None:
    """Run the agent on every benchmark prompt -> <out>/results.json and <out>/ref_images/
    (gsjax's agent also keeps each episode in <out>/episodes/)."""
    items = load_benchmark(benchmark)
    _run_agent(items, out, runner, runner_config, workers)


def _image_generator(url: str, backend: str, model: str, key_env: str) -> Any:
    """The image backend the options name (spec §6.4): a gsjax/Qwen-Image server or an OpenAI images API."""
    from gsjax.imagegen.client import ImageGenConfig, make_image_generator

    try:
        return make_image_generator(ImageGenConfig(backend=backend, urls=(url,), model=model, api_key_env=key_env))
    except ValueError as exc:
        _fail(exc)


def _generate(results: Path, out: Path, generator: Any, max_images: int, direct: bool, workers: int,
              attempts: int) -> None:
    rows = knowgen.read_stage_rows(results)
    with RichStageProgress("generate", _not_success) as progress:
        path = knowgen.generate_stage(rows, results.parent, out, generator, max_images=max_images, direct=direct,
                                      attempts=attempts, workers=workers, progress=progress)
    console.print(f"wrote {path} (the judge input)")


@knowgen_app.command("generate")
def knowgen_generate(
    results: Annotated[Path, typer.Option(help="results.json of `run`, or a benchmark file for direct generation.")],
    out: Out,
    generator_url: GeneratorUrl = "http://127.0.0.1:8000",
    max_images: Annotated[int, typer.Option(help="Reference images sent to the generator.")] = 3,
    direct: Annotated[bool, typer.Option(help="Ignore gen_prompt/references: render the original prompt.")] = False,
    workers: Workers = 1,
    attempts: Annotated[int, typer.Option(help="Generation attempts per sample.")] = 3,
    generator_backend: GeneratorBackend = "server",
    generator_model: GeneratorModel = "gpt-image-1",
    generator_api_key_env: GeneratorKeyEnv = "OPENAI_API_KEY",
) -> None:
    """Render every sample -> <out>/images/<id>.png and <out>/results.json."""
    generator = _image_generator(generator_url, generator_backend, generator_model, generator_api_key_env)
    _generate(results, out, generator, max_images, direct, workers, attempts)


@knowgen_app.command("judge")
def knowgen_judge(
    input: Annotated[Path, typer.Option("--input", help="Judge input (§6.1), e.g. generate's results.json.")],
    out: Annotated[Path | None, typer.Option("--out", help="Judgements JSONL (default: beside the input).")] = None,
    judge_base_url: JudgeUrl = "https://api.openai.com/v1",
    judge_model: Annotated[str, typer.Option(envvar="GEN_REWARD_MODEL")] = "gpt-4.1",
    judge_api_key_env: JudgeKeyEnv = "GEN_REWARD_API_KEY",
    judge_max_attempts: JudgeAttempts = 20,
    judge_timeout: JudgeTimeout = 300.0,
    judge_cache: JudgeCache = None,
    heuristic: Annotated[bool, typer.Option(help="Offline HEURISTIC scores (demo only; not a judge model).")] = False,
    workers: Workers = 8,
) -> None:
    """Judge each generated image against its ground truth -> judgements JSONL + results_eval.json."""
    inputs = load_judge_inputs(input)
    judge: ImageJudgeBackend = HeuristicImageJudge() if heuristic else ImageJudge(
        _judge_client(judge_base_url, judge_model, judge_api_key_env, judge_max_attempts, judge_timeout, judge_cache))
    with RichStageProgress("judge", _not_judged) as progress:
        path = knowgen.judge_stage(inputs, out or input.with_name("judgments.jsonl"), judge, workers=workers,
                                   progress=progress)
    console.print(f"wrote {path} and {path.with_name('results_eval.json')}")


@knowgen_app.command("score")
def knowgen_score(
    judgments: Annotated[Path, typer.Option(help="Judgements (JSONL or results_eval.json) from any system.")],
    out: Out,
    benchmark: Annotated[Path | None, typer.Option(
        help="Benchmark file: unjudged samples count as failures.")] = None,
    title: str = "KnowGen",
) -> None:
    """K-Score (strict and upstream), per group/category/difficulty -> score.json, report.md, categories.png."""
    expected = load_benchmark(benchmark, require_gt=False) if benchmark else ()
    report = knowgen.score_stage(judgments, out, expected=expected, title=title)
    if report["unknown_category"]["count"]:
        console.print("[yellow]warning:[/yellow] excluded samples with an unknown category: "
                      f"{report['unknown_category']['ids']}")
    console.print(f"K-Score strict {report['kscore_strict']:.2f} | upstream {report['kscore_upstream']:.2f} | "
                  f"failures {report['failures']['count']} -> {out / 'report.md'}")


@knowgen_app.command("compare")
def knowgen_compare(
    runs: Annotated[list[str], typer.Argument(help="NAME=path/to/score.json (or just the path).")], out: Out
) -> None:
    """Put several runs side by side -> compare.json, compare.md, compare.png."""
    named = {}
    for spec in runs:
        name, sep, path = spec.partition("=")
        named[name if sep else Path(spec).parent.name] = Path(path if sep else spec)
    table = knowgen.compare_stage(named, out)
    for name, row in table["runs"].items():
        console.print(f"{name}: K-Score strict {row['kscore_strict']:.2f} | upstream {row['kscore_upstream']:.2f}")


# ------------------------------------------------------------------ wise

WiseData = Annotated[Path, typer.Option("--data", help="WISE data folder (or one of its JSON files).")]


@wise_app.command("run")
def wise_run(data: WiseData, out: Out, runner: RunnerSpec = DEFAULT_RUNNER, runner_config: RunnerConfig = None,
             workers: Workers = 5) -> None:
    """Run the agent on the WISE prompts (prompt only; WISE has no ground-truth image)."""
    _run_agent([it.as_benchmark_item() for it in wise.load_wise(data)], out, runner, runner_config, workers)


@wise_app.command("generate")
def wise_generate(
    out: Out,
    results: Annotated[Path | None, typer.Option(help="results.json of `wise run`.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Direct generation from the WISE prompts.")] = None,
    generator_url: GeneratorUrl = "http://127.0.0.1:8000",
    max_images: int = 3,
    workers: Workers = 1,
    attempts: int = 3,
    generator_backend: GeneratorBackend = "server",
    generator_model: GeneratorModel = "gpt-image-1",
    generator_api_key_env: GeneratorKeyEnv = "OPENAI_API_KEY",
) -> None:
    """Render the WISE samples -> <out>/images/<prompt_id>.png (the layout `wise judge` reads)."""
    if (results is None) == (data is None):
        raise typer.BadParameter("give exactly one of --results and --data")
    generator = _image_generator(generator_url, generator_backend, generator_model, generator_api_key_env)
    if data is not None:
        rows = [{"id": it.prompt_id, "prompt": it.prompt, "meta": {"category": it.subset}}
                for it in wise.load_wise(data)]
        with RichStageProgress("generate", _not_success) as progress:
            knowgen.generate_stage(rows, data, out, generator, max_images=max_images, attempts=attempts,
                                   workers=workers, progress=progress)
        return
    _generate(results, out, generator, max_images, False, workers, attempts)


@wise_app.command("judge")
def wise_judge(
    data: WiseData,
    images: Annotated[Path, typer.Option(help="Folder of <prompt_id>.png images.")],
    out: Annotated[Path, typer.Option("--out", help="Judgements JSONL.")],
    judge_base_url: JudgeUrl = "https://api.openai.com/v1",
    judge_model: Annotated[str, typer.Option()] = "gpt-4o-2024-05-13",
    judge_api_key_env: JudgeKeyEnv = "OPENAI_API_KEY",
    judge_max_attempts: JudgeAttempts = 10,
    judge_timeout: JudgeTimeout = 300.0,
    judge_cache: JudgeCache = None,
    workers: Workers = 8,
) -> None:
    """Score consistency, realism and aesthetic quality (0-2) of each image."""
    judge = wise.WiseJudge(_judge_client(judge_base_url, judge_model, judge_api_key_env, judge_max_attempts,
                                         judge_timeout, judge_cache))
    with RichStageProgress("wise judge", _not_judged) as progress:
        wise.wise_judge_stage(wise.load_wise(data), images, out, judge, workers=workers, progress=progress)
    console.print(f"wrote {out}")


@wise_app.command("score")
def wise_score(judgments: Annotated[Path, typer.Option(help="Judgements JSONL of `wise judge`.")], out: Out) -> None:
    """WiScore per subset and overall (weighted by subset size) -> score.json, report.md, subsets.png."""
    summary = wise.wise_summary(read_records(judgments))
    wise.write_wise_report(summary, out)
    console.print(f"WiScore overall strict {summary['overall_strict']:.4f} | judged only "
                  f"{summary['overall_judged_only']:.4f} | failures {summary['failures']}")
