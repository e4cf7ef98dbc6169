"""The two request-line formats a batch file may use, and the result line each one gets back.

OpenAI Batch (what vLLM's run_batch also reads): {"custom_id", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions", "body": {model, messages | prompt, max_tokens, ...}}.
Plain: {"id", "prompt" | "messages", sampling fields}. A line that cannot be served raises
LineError with the reason; the job records it and goes on.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from sidp.model.checkpoint import chat_prompt

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
# The sampling fields a line may set, with vLLM's names (OpenAI's max_completion_tokens too).
SAMPLING_FIELDS = (
    *("temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "stop_token_ids", "ignore_eos"),
)
OPENAI_BODY_FIELDS = {"model", "messages", "prompt", "max_completion_tokens", "n", *SAMPLING_FIELDS}


class LineError(Exception):
    """Why one request line cannot be served; the rest of the job runs."""


@dataclass(slots=True)
class BatchRequest:
    id: str
    openai: bool  # answer in the OpenAI Batch output format
    messages: list[dict] | None = None
    prompt: str | None = None
    sampling: dict = field(default_factory=dict)
    derived_id: bool = False  # a plain line without "id": named by its content (content_id)


def content_id(record: dict) -> str:
    """The id of a plain line that has none: its content's hash, so that an edited input (lines added,
    removed or reordered) still resumes each request against its own result."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "line-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_line(text: str) -> BatchRequest:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise LineError(f"not valid JSON: {error.msg}") from None
    if not isinstance(record, dict):
        raise LineError("a request line must be a JSON object")
    if "custom_id" in record or "body" in record:
        return _openai(record)
    return _plain(record)


def _openai(record: dict) -> BatchRequest:
    unknown = set(record) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise LineError(f"unknown field(s) {', '.join(sorted(unknown))}")
    if not isinstance(record.get("custom_id"), str) or not record["custom_id"]:
        raise LineError('an OpenAI Batch line needs a "custom_id" string')
    if record.get("method", "POST") != "POST":
        raise LineError(f'method must be "POST", got {record.get("method")!r}')
    url, body = record.get("url"), record.get("body")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise LineError(f"url must be {CHAT_URL} or {COMPLETIONS_URL}, got {url!r}")
    if not isinstance(body, dict):
        raise LineError('an OpenAI Batch line needs a "body" object')
    unknown = set(body) - OPENAI_BODY_FIELDS
    if unknown:
        raise LineError(f"unknown or unsupported body field(s) {', '.join(sorted(unknown))}")
    if body.get("n", 1) != 1:
        raise LineError("n must be 1: sidp returns one completion per request")
    sampling = {k: body[k] for k in SAMPLING_FIELDS if k in body}
    if "max_completion_tokens" in body:
        sampling["max_tokens"] = body["max_completion_tokens"]
    key = "messages" if url == CHAT_URL else "prompt"
    request = BatchRequest(record["custom_id"], True, sampling=sampling)
    _set_input(request, body, key)
    return request


def _plain(record: dict) -> BatchRequest:
    unknown = set(record) - {"id", "prompt", "messages", *SAMPLING_FIELDS}
    if unknown:
        raise LineError(f"unknown field(s) {', '.join(sorted(unknown))}")
    if ("prompt" in record) == ("messages" in record):
        raise LineError('needs exactly one of "prompt" or "messages"')
    request_id = record.get("id", content_id(record))
    if not isinstance(request_id, str) or not request_id:
        raise LineError('"id" must be a non-empty string')
    request = BatchRequest(request_id, False, sampling={k: record[k] for k in SAMPLING_FIELDS if k in record})
    request.derived_id = "id" not in record
    _set_input(request, record, "messages" if "messages" in record else "prompt")
    return request


def _set_input(request: BatchRequest, source: dict, key: str) -> None:
    value = source.get(key)
    if key == "prompt":
        if not isinstance(value, str) or not value:
            raise LineError('"prompt" must be a non-empty string')
        request.prompt = value
        return
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise LineError('"messages" must be a non-empty list of {"role", "content"} objects')
    request.messages = value


def prompt_token_ids(tokenizer, request: BatchRequest) -> list[int]:
    """The request's prompt as LLM.generate (a prompt) or LLM.chat (messages) would tokenize it."""
    if request.messages is not None and tokenizer.chat_template is None:
        raise LineError("the model has no chat template; send a prompt instead of messages")
    try:
        if request.messages is None:
            ids = tokenizer.encode(request.prompt)
        else:
            ids = chat_prompt(tokenizer, request.messages)[1]
    except Exception as error:  # tokenizers and jinja raise many types here; all mean a malformed line
        raise LineError(f"cannot be tokenized ({error}); check its prompt or messages") from None
    if not ids:
        raise LineError("the prompt is empty")
    return ids


def result_line(request: BatchRequest, output, model: str) -> dict:
    """The line a finished request writes, in its own format."""
    completion = output.outputs[0]
    usage = {
        "prompt_tokens": len(output.prompt_token_ids),
        "completion_tokens": len(completion.token_ids),
    }
    if not request.openai:
        return {"id": request.id, "text": completion.text, "finish_reason": completion.finish_reason, **usage}
    chat = request.messages is not None
    choice = {"index": 0, "finish_reason": completion.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": completion.text}
    else:
        choice["text"] = completion.text
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{request.id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
    }
    return {
        "id": f"batch_req_{request.id}",
        "custom_id": request.id,
        "response": {"status_code": 200, "request_id": f"req_{request.id}", "body": body},
        "error": None,
    }


def line_id(text: str) -> str | None:
    """The id a result line answers (custom_id or id), or None for a line that is not a whole result."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    return record.get("custom_id", record.get("id"))
