"""OpenAI request schemas and the OpenAI error body.

Models are strict (no "5" for 5, no 1.0 for n) because the OpenAI API refuses
wrongly typed fields with a 400 and clients rely on that; unknown fields are
ignored as OpenAI's own SDKs send fields we do not need. Parameters we do not
implement are refused when set, rather than silently ignored: OpenAI's and
vLLM's extensions (`VLLM_EXTENSIONS`) alike, since a vLLM user who finds top_k
and stop_token_ids honoured will expect min_p or guided_json to be too.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """Any error the ingress answers with an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    # vLLM's defaults: stream_options given without include_usage streams the usage; null does not
    include_usage: Optional[bool] = True
    continuous_usage_stats: Optional[bool] = False  # vLLM's: with include_usage, every chunk carries the usage


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]


# vLLM's sampling extensions this server does not implement -> their neutral value: refused
# (400 naming them) when set to anything else
VLLM_EXTENSIONS = {"min_tokens": 0, "min_p": 0, "repetition_penalty": 1, "length_penalty": 1, "use_beam_search": False,
                   "include_stop_str_in_output": False, "bad_words": [], "allowed_token_ids": None,
                   "prompt_logprobs": None, "truncate_prompt_tokens": None, "guided_json": None, "guided_regex": None,
                   "guided_choice": None, "guided_grammar": None, "guided_decoding_backend": None,
                   "structured_outputs": None, "structural_tag": None, "skip_special_tokens": True,
                   "return_tokens_as_token_ids": False, "return_token_ids": False, "logits_processors": None,
                   "priority": 0, "vllm_xargs": None, "prompt_embeds": None,
                   # chat's (completions declare their own): special tokens around the templated prompt
                   "add_special_tokens": False,
                   # chat's: each changes the prompt or the answer (completions declare their own echo)
                   "echo": False, "add_generation_prompt": True, "continue_final_message": False,
                   "chat_template": None}


# apply_chat_template's own parameters and what the server passes the template itself
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


class _Sampling(_Request):
    """Fields shared by completions and chat. Unknown fields are kept (model_extra) only to be
    checked against VLLM_EXTENSIONS."""
    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    temperature: Optional[Union[float, int]] = Field(None, ge=0, le=2)
    top_p: Optional[Union[float, int]] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # extension (vLLM's): 0 or -1 is off
    n: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0)]]] = None  # extension
    ignore_eos: Optional[bool] = False  # extension
    seed: Optional[int] = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as vLLM takes it
    presence_penalty: Optional[Union[float, int]] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[Union[float, int]] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, Union[float, int]]] = None
    response_format: Optional[ResponseFormat] = None  # vLLM's completions take it too
    user: Optional[str] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(param, message) for a parameter set to something we do not implement."""
        if self.presence_penalty or self.frequency_penalty:
            p = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return p, f"{p} is not supported; leave it at 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", "only response_format type 'text' is supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        extra = self.model_extra or {}
        for name, neutral in VLLM_EXTENSIONS.items():
            value = extra.get(name)
            if value is not None and not (value == neutral and type(value) is not str):
                return name, f"{name} is not supported"
        return None


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    # omitted: OpenAI's 16, clamped to the context's room and the server's limit (request_plan)
    max_tokens: Optional[int] = None
    add_special_tokens: bool = True  # vLLM's extension: the tokenizer's BOS etc. around a text prompt
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[bool] = False
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None

    def unsupported(self):
        if self.logprobs:
            return "logprobs", "only logprobs=0 (the sampled token's log probability) is supported"
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of", "best_of other than n is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        # one line per part, as vLLM joins a message's text parts for a string chat template
        return "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    functions: Optional[list] = None  # OpenAI's deprecated form of tools
    function_call: Optional[Union[str, dict]] = None
    # vLLM's: extra variables for the chat template (e.g. enable_thinking); the names our own call
    # to the template sets are refused, as they would change what the server asked of it
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def unsupported(self):
        if self.top_logprobs:
            return "top_logprobs", "only top_logprobs=0 (the sampled token's log probability) is supported"
        if self.tools:
            return "tools", "tools are not supported"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool_choice is not supported"
        if self.functions:
            return "functions", "functions are not supported"
        if self.function_call not in (None, "none"):
            return "function_call", "function_call is not supported"
        taken = sorted(set(self.chat_template_kwargs or {}) & RESERVED_TEMPLATE_KWARGS)
        if taken:
            return "chat_template_kwargs", f"chat_template_kwargs may not set {', '.join(taken)}"
        return super().unsupported()

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
