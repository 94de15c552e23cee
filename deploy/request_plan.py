"""From a validated OpenAI request to generation jobs: tokenize, check limits, sample params.

Everything that can be refused is refused here, in the ingress, before a replica
is involved: a bad request then costs no GPU time and cannot disturb a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from deploy.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class Limits:
    model_name: str
    vocab_size: int
    max_model_len: int
    max_tokens_limit: int
    default_max_tokens: int
    max_choices: int


@dataclass
class Job:
    index: int  # the choice index in the response
    prompt_ids: list[int]
    params: dict  # SamplingParams fields


@dataclass
class Plan:
    kind: str  # "completion" | "chat"
    jobs: list[Job]
    prompt_tokens: int  # each distinct prompt counted once, as OpenAI does with n > 1
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # every stream chunk carries the usage so far (vLLM's extension)


def check_model(requested: str, limits: Limits):
    if requested != limits.model_name:
        raise APIError(404, f"The model '{requested}' does not exist; this server serves '{limits.model_name}'",
                       "invalid_request_error", "model", "model_not_found")


def _prompt_parts(req: CompletionRequest) -> tuple[Optional[list[str]], Optional[list[list[int]]]]:
    """The prompt as texts or as token id lists, its shape checked, nothing tokenized yet."""
    p = req.prompt
    if isinstance(p, str):
        return [p], None
    if len(p) == 0:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(x, str) for x in p):
        return p, None
    if all(isinstance(x, int) for x in p):
        return None, [p]
    if all(isinstance(x, list) for x in p):
        return None, p
    raise bad_request("prompt must be a string, a list of strings, or token ids", "prompt")


def _prompt_ids(req: CompletionRequest, texts, ids, tok, limits: Limits) -> list[list[int]]:
    if texts is not None:
        # as vLLM and HF tokenize a text prompt: with the tokenizer's BOS (Llama-style models need it)
        ids = [tok(t, add_special_tokens=req.add_special_tokens)["input_ids"] for t in texts]
    for one in ids:
        if not one:
            raise bad_request("prompt must not be empty", "prompt")
        if any(not 0 <= t < limits.vocab_size for t in one):
            raise bad_request(f"token ids must be in [0, {limits.vocab_size})", "prompt")
    return ids


def chat_prompt(req: ChatCompletionRequest, tok) -> list[int]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                       **(req.chat_template_kwargs or {}))
    except Exception as e:  # the template itself refuses some orders of roles
        raise bad_request(f"messages do not fit the model's chat template: {e}", "messages") from None
    # the template already holds the special tokens
    return tok(text, add_special_tokens=False)["input_ids"]


def _sampling(req, max_tokens: int, logprobs: bool, seed: Optional[int]) -> dict:
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop is not None else [])
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
    if any(s == "" for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    top_k = req.top_k if req.top_k and req.top_k > 0 else 0
    return dict(max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                top_k=top_k, seed=seed, stop=list(stop), stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=bool(req.ignore_eos), logprobs=logprobs)


def _max_tokens(requested: Optional[int], prompt_len: int, limits: Limits, default: int, param: str,
                prompt_param: str) -> int:
    room = limits.max_model_len - prompt_len
    if room <= 0:
        raise bad_request(f"This model's maximum context length is {limits.max_model_len} tokens. "
                          f"However, your prompt has {prompt_len} tokens.", prompt_param, "context_length_exceeded")
    if requested is None:
        return min(default, room, limits.max_tokens_limit)
    if requested < 1:
        raise bad_request(f"{param} must be at least 1, got {requested}", param)
    if requested > limits.max_tokens_limit:
        raise bad_request(f"{param} is {requested}; this server allows at most {limits.max_tokens_limit}", param)
    if requested > room:
        raise bad_request(f"This model's maximum context length is {limits.max_model_len} tokens. However, you "
                          f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                          f"in the completion).", param, "context_length_exceeded")
    return requested


def _check_common(req, limits: Limits, num_prompts: int):
    check_model(req.model, limits)
    bad = req.unsupported()
    if bad:
        raise bad_request(bad[1], bad[0])
    n = req.n or 1
    if n * num_prompts > limits.max_choices:
        raise bad_request(f"{n * num_prompts} choices requested; this server allows at most {limits.max_choices} "
                          f"per request (prompts x n)", "n")
    return n


def _seed(req, j: int) -> Optional[int]:
    # choices of one request must differ, yet a seeded request must repeat exactly; the API's
    # int64 seeds map onto the engine's [0, 2**64) (what a torch generator takes)
    return None if req.seed is None else (req.seed + j) % 2**64


def _usage_options(req) -> dict:
    """A Plan's usage fields; continuous usage needs include_usage, as in vLLM."""
    so = req.stream_options
    usage = bool(so and so.include_usage)
    return dict(include_usage=usage, continuous_usage=usage and bool(so.continuous_usage_stats))


def plan_completion(req: CompletionRequest, tok, limits: Limits) -> Plan:
    check_model(req.model, limits)
    texts, ids = _prompt_parts(req)
    # the choices cap before any tokenizing: planning runs on one thread for every request
    n = _check_common(req, limits, len(texts if texts is not None else ids))
    prompts = _prompt_ids(req, texts, ids, tok, limits)
    jobs = []
    for i, ids in enumerate(prompts):
        mt = _max_tokens(req.max_tokens, len(ids), limits, 16, "max_tokens", "prompt")
        for j in range(n):
            jobs.append(Job(i * n + j, ids, _sampling(req, mt, req.logprobs is not None, _seed(req, j))))
    return Plan("completion", jobs, sum(len(p) for p in prompts), bool(req.stream), **_usage_options(req))


def plan_chat(req: ChatCompletionRequest, tok, limits: Limits) -> Plan:
    n = _check_common(req, limits, 1)
    ids = chat_prompt(req, tok)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    mt = _max_tokens(req.requested_max_tokens(), len(ids), limits, limits.default_max_tokens, param, "messages")
    jobs = [Job(j, ids, _sampling(req, mt, bool(req.logprobs), _seed(req, j))) for j in range(n)]
    return Plan("chat", jobs, len(ids), bool(req.stream), **_usage_options(req))
