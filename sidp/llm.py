"""LLM: vLLM's offline API — load a model once, then `generate` / `chat` over lists of prompts.

The driver tokenizes, checks every request before any work starts (so one bad prompt costs
nothing), hands token ids to the engine, and detokenizes the results back in input order.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from pathlib import Path

from tqdm import tqdm

from sidp.engine.group import ReplicaGroup
from sidp.engine.llm_engine import FinishedRequest, LLMEngine
from sidp.engine_args import EngineArgs
from sidp.errors import SidpError
from sidp.memory import format_bytes
from sidp.model.checkpoint import chat_prompt, load_tokenizer, read_config
from sidp.model.spec import ModelSpec
from sidp.outputs import CompletionOutput, RequestOutput
from sidp.sampling_params import SamplingParams
from sidp.signals import sigterm_interrupts

logger = logging.getLogger("sidp")

PromptLike = str | list[int] | dict


class LLM:
    def __init__(self, model: str | Path | None = None, **kwargs):
        """kwargs: the fields of EngineArgs (dtype, device, max_model_len, max_num_seqs,
        max_num_batched_tokens, memory_per_replica, gpu_memory_utilization, enable_prefix_caching,
        block_size, data_parallel_size, weight_sharing, sidp_mode, placement, cache_slots, pooled_parts,
        mode_probe_every)."""
        known = [f.name for f in dataclasses.fields(EngineArgs)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise SidpError(
                f"LLM() got unknown argument(s) {', '.join(unknown)}; it takes {', '.join(known)}."
            )
        self._start(EngineArgs(model=model, **kwargs))

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLM:
        llm = cls.__new__(cls)
        llm._start(args)
        return llm

    def _start(self, args: EngineArgs) -> None:
        _configure_logging()
        if args.model is None:
            from sidp.model.default_model import default_model_path

            args = dataclasses.replace(args, model=default_model_path())
        self.model_path = Path(args.model)
        hf_config = read_config(self.model_path)
        self.spec = ModelSpec.from_hf_config(hf_config)
        plan = args.resolve(self.spec, hf_config)
        self.config, self.plans = plan.config, list(plan.plans)
        self.max_model_len = plan.config.max_model_len
        if plan.pooled and plan.plain is None:
            logger.info(
                "plain DP could not hold this model in memory_per_replica=%s",
                format_bytes(plan.tightest.budget),
            )
        if self.max_model_len < self.spec.max_position_embeddings and args.max_model_len is None:
            logger.info(
                "max_model_len lowered from %d to %d: that is all the KV cache holds.",
                self.spec.max_position_embeddings,
                self.max_model_len,
            )
        report = plan.tightest.report(self.max_model_len, plan.plain if plan.pooled else None)
        for line in report.splitlines():
            logger.info("%s", line)
        self._next_request_id = 0
        if args.in_driver:
            self.tokenizer = load_tokenizer(self.model_path)
            # Stop strings decode with the driver's tokenizer, which the ledger counts for this replica.
            decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
            self.engine = LLMEngine(self.config, self.spec, plan.plans[0], decode=decode)
            self._backend = self.engine
        else:
            logger.info(
                "starting %d replica%s (%s; above: the tightest replica)",
                plan.size,
                "s" if plan.size > 1 else "",
                plan.describe(),
            )
            self.tokenizer, self._backend = _while_loading_tokenizer(
                self.model_path, lambda: ReplicaGroup(self.config, self.spec, self.plans)
            )
        # What ends a request unless ignore_eos, as in vLLM: the tokenizer's EOS and the model config's.
        ids = {*self.spec.eos_token_ids, self.tokenizer.eos_token_id} - {None}
        self.eos_token_ids = tuple(sorted(ids))

    # --- public API --------------------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptLike | Seq[PromptLike],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        on_output: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """on_output(index, output): called as each request finishes, in finishing order (batch jobs
        write results as they come)."""
        items = [prompts] if _is_single_prompt(prompts) else list(prompts)
        token_lists = [self._tokenize(p, i) for i, p in enumerate(items)]
        texts = [
            p if isinstance(p, str) else (p.get("prompt") if isinstance(p, dict) else None) for p in items
        ]
        params = self._per_request(sampling_params, len(items))
        return self._run(texts, token_lists, params, use_tqdm, on_output)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        on_output: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if self.tokenizer.chat_template is None:
            raise SidpError(f"{self.model_path} has no chat template; use generate() with plain prompts.")
        prompts = [chat_prompt(self.tokenizer, c, add_generation_prompt) for c in conversations]
        texts = [text for text, _ in prompts]
        token_lists = [self._check(ids, i) for i, (_, ids) in enumerate(prompts)]
        params = self._per_request(sampling_params, len(texts))
        return self._run(texts, token_lists, params, use_tqdm, on_output)

    # --- internals ---------------------------------------------------------------------------------

    def _tokenize(self, prompt: PromptLike, index: int) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        elif isinstance(prompt, dict) and "prompt" in prompt:
            ids = self.tokenizer.encode(prompt["prompt"])
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise SidpError(
                f"Prompt {index} is neither text nor a list of token ids: {type(prompt).__name__}."
            )
        return self._check(ids, index)

    def _check(self, ids: list[int], index: int) -> list[int]:
        if not ids:
            raise SidpError(f"Prompt {index} is empty.")
        if len(ids) >= self.max_model_len:
            raise SidpError(
                f"Prompt {index} has {len(ids)} tokens; with max_model_len={self.max_model_len} it must be "
                "shorter to leave room for at least one output token."
            )
        if not all(0 <= t < self.spec.vocab_size for t in ids):
            raise SidpError(
                f"Prompt {index} holds a token id outside the vocabulary (0..{self.spec.vocab_size - 1})."
            )
        return ids

    def _per_request(
        self, params: SamplingParams | Seq[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        """Each request's params, with the model's EOS ids (on copies: the caller's stay as they were)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * count
        params = list(params)
        if len(params) != count:
            raise SidpError(
                f"Got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt."
            )
        distinct = {id(p): p for p in params}  # one copy per object, however many requests share it
        copies = {i: dataclasses.replace(p, _eos_token_ids=self.eos_token_ids) for i, p in distinct.items()}
        return [copies[id(p)] for p in params]

    def _run(self, texts, token_lists, params, use_tqdm: bool, on_output=None) -> list[RequestOutput]:
        bar = tqdm(total=len(token_lists), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        started, tokens_in, tokens_out = time.perf_counter(), 0, 0
        first_id = self._next_request_id
        outputs: list[RequestOutput] = [None] * len(token_lists)  # each built (decoded) once, as it ends

        def on_finish(done: FinishedRequest) -> None:
            nonlocal tokens_in, tokens_out
            tokens_in += len(token_lists[done.seq_id])
            tokens_out += len(done.output_token_ids)
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(
                f"est. speed input: {tokens_in / elapsed:.2f} toks/s, "
                f"output: {tokens_out / elapsed:.2f} toks/s",
                refresh=False,
            )
            bar.update(1)
            i = done.seq_id
            outputs[i] = self._output(str(first_id + i), done, texts[i], token_lists[i])
            if on_output is not None:
                on_output(i, outputs[i])

        try:
            with sigterm_interrupts():
                self._backend.run(list(zip(token_lists, params, strict=True)), on_finish)
        except KeyboardInterrupt:
            finished = sum(out is not None for out in outputs)
            raise KeyboardInterrupt(
                f"interrupted: {finished} of {len(outputs)} requests had finished (each passed to on_output "
                "as it did); every replica is stopped"
            ) from None
        finally:
            bar.close()
        for counters in self.replica_counters():
            logger.info("%s", ", ".join(f"{k} {v}" for k, v in counters.items() if k != "probes"))
        self._next_request_id = first_id + len(outputs)
        return outputs

    def _output(
        self, request_id: str, done: FinishedRequest, prompt: str | None, ids: list[int]
    ) -> RequestOutput:
        text = self.tokenizer.decode(done.output_token_ids, skip_special_tokens=True)
        if isinstance(done.stop_reason, str) and done.stop_reason in text:  # vLLM's rule: the text
            text = text[: text.find(done.stop_reason)]  # ends before the stop string
        completion = CompletionOutput(0, text, done.output_token_ids, done.finish_reason, done.stop_reason)
        return RequestOutput(request_id, prompt, ids, [completion], num_cached_tokens=done.num_cached_tokens)

    def replica_counters(self) -> list[dict]:
        """Each replica's cumulative figures (steps, preemptions, SiDP mode counters), by replica."""
        if isinstance(self._backend, LLMEngine):
            return [self._backend.counters()]
        return [self._backend.counters[rank] for rank in sorted(self._backend.counters)]

    def replica_pids(self) -> list[int]:
        """The process of each replica: this one for a single replica, else the group's, by rank."""
        if isinstance(self._backend, LLMEngine):
            return [os.getpid()]
        return [proc.pid for proc in self._backend.procs]

    def close(self) -> None:
        """Stop the replicas (if any); the LLM cannot generate afterwards. Also done when the LLM is
        garbage-collected or the interpreter exits, and at the end of a `with LLM(...) as llm:` block."""
        self._backend.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _while_loading_tokenizer(path: Path, start: Callable[[], ReplicaGroup]) -> tuple:
    """(the model's tokenizer, start()): the tokenizer loads in a thread of this process while the replicas
    start in theirs (transformers' import alone takes seconds). Should either fail, the group is stopped."""
    tokenizer: Future = Future()

    def load() -> None:
        try:
            tokenizer.set_result(load_tokenizer(path))
        except BaseException as error:  # raised in the caller's thread by result()
            tokenizer.set_exception(error)

    # daemon: an interrupted start need not wait for transformers to finish importing
    threading.Thread(target=load, name="sidp-tokenizer", daemon=True).start()
    group = start()
    try:
        return tokenizer.result(), group
    except BaseException:  # the tokenizer's error, or Ctrl-C while waiting for it
        group.close(at_once=True)
        raise


def _is_single_prompt(prompts) -> bool:
    if isinstance(prompts, str | dict):
        return True
    return isinstance(prompts, list) and bool(prompts) and all(isinstance(t, int) for t in prompts)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (notebooks and test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging() -> None:
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s sidp: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
