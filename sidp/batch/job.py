"""A batch job: every good line of the input served, each result appended to the output (flushed) as it
finishes, so the output is always a valid prefix of the results and a rerun resumes where it stopped.

Bad lines never cost good ones: each gets a record in the errors file (line number, id, reason) and
the job goes on; `strict` stops before any work instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from sidp.batch.formats import BatchRequest, LineError, parse_line, prompt_token_ids, result_line
from sidp.batch.output import OutputFile
from sidp.errors import SidpError
from sidp.sampling_params import SamplingParams


@dataclass(slots=True)
class JobSummary:
    ok: int = 0  # finished in this run
    resumed: int = 0  # already in the output from an earlier run
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    errors: list[dict] = field(default_factory=list)  # one record per line that failed

    @property
    def failed(self) -> int:
        return len(self.errors)

    def lines(self) -> list[str]:
        speed = self.completion_tokens / self.wall_s if self.wall_s else 0.0
        return [
            f"requests: {self.ok} ok, {self.resumed} already done, {self.failed} failed",
            f"tokens: {self.prompt_tokens:,} in, {self.completion_tokens:,} out in {self.wall_s:.1f} s "
            f"({speed:.1f} output tokens/s)",
        ]


def errors_path(output: Path) -> Path:
    return output.with_name(output.stem + ".errors.jsonl")


def read_lines(source: Path) -> list[bytes]:
    try:
        return source.read_bytes().split(b"\n")
    except OSError as error:
        raise SidpError(f"Cannot read --input {source}: {error.strerror}.") from None


def parse_requests(
    raw: list[bytes], source: str, strict: bool
) -> tuple[list[tuple[int, BatchRequest]], list[dict]]:
    """(line number, request) of each good line, and an error record for each bad one."""
    good, errors, first_line = [], [], {}
    for number, data in enumerate(raw, 1):
        if not data.strip():
            continue
        try:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise LineError(f"not UTF-8 (byte {error.start})") from None
            request = parse_line(text)
            if request.derived_id:  # the same content again is another request: number its copies
                base, copy = request.id, 1
                while request.id in first_line:
                    copy += 1
                    request.id = f"{base}-{copy}"
            if request.id in first_line:
                raise LineError(f"duplicate id {request.id!r} (first on line {first_line[request.id]})")
            first_line[request.id] = number
            good.append((number, request))
        except LineError as error:
            if strict:
                raise SidpError(f"{source} line {number}: {error}.") from None
            errors.append({"line": number, "error": str(error)})
    if not good and not errors:
        raise SidpError(f"{source} holds no requests.")
    return good, errors


def run_job(
    llm,
    good: list[tuple[int, BatchRequest]],
    errors: list[dict],
    source: str,
    output: OutputFile | None,
    defaults: dict,
    strict: bool,
    show_progress: bool,
) -> tuple[JobSummary, list[tuple[BatchRequest, object]]]:
    """Serve the parsed lines (parse_requests); results go to `output` as they finish (or are returned,
    in input order); `errors`, the unparsable lines, grows by the lines the model cannot serve. An
    interrupt (Ctrl-C, SIGTERM) is raised again with a line saying what is safely written."""
    summary = JobSummary()
    done = output.finished_ids() if output is not None else set()
    todo = []
    for number, request in good:
        if request.id in done:
            summary.resumed += 1
            continue
        try:
            todo.append((request, _token_ids(llm, request), _sampling(defaults, request)))
        except (LineError, SidpError) as error:
            if strict:
                raise SidpError(f"{source} line {number}: {error}") from None
            errors.append({"line": number, "id": request.id, "error": str(error).rstrip(".")})
    summary.errors = errors
    if output is not None:
        errors_path(output.path).write_text("".join(json.dumps(e) + "\n" for e in errors), encoding="utf-8")
    results: list[tuple[BatchRequest, object]] = []
    if not todo:
        return summary, results
    model = llm.model_path.name

    def on_output(index: int, out) -> None:
        request = todo[index][0]
        summary.ok += 1
        summary.prompt_tokens += len(out.prompt_token_ids)
        summary.completion_tokens += len(out.outputs[0].token_ids)
        if output is not None:
            output.write(result_line(request, out, model))

    started = time.perf_counter()
    try:
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for _, ids, _ in todo],
            [params for _, _, params in todo],
            use_tqdm=show_progress,
            on_output=on_output,
        )
    except KeyboardInterrupt:
        if output is None:
            raise  # the LLM's own line says how far it got
        raise KeyboardInterrupt(
            f"{summary.ok} results of this run are safely in {output.path}, {len(todo) - summary.ok} "
            "requests still to do; run the same command again to finish them"
        ) from None
    finally:
        summary.wall_s = time.perf_counter() - started
    results = [(request, out) for (request, _, _), out in zip(todo, outputs, strict=True)]
    return summary, results


def _token_ids(llm, request: BatchRequest) -> list[int]:
    """The prompt as the engine will see it, checked here so that one bad prompt fails alone."""
    ids = prompt_token_ids(llm.tokenizer, request)
    if len(ids) >= llm.max_model_len:
        raise LineError(
            f"the prompt has {len(ids)} tokens; max_model_len={llm.max_model_len} leaves no room to answer"
        )
    return ids


def _sampling(defaults: dict, request: BatchRequest) -> SamplingParams:
    try:
        return SamplingParams(**{**defaults, **request.sampling})
    except (TypeError, ValueError) as error:
        raise LineError(f"bad sampling field: {error}") from None
