"""The HTTP ingress: OpenAI-compatible routes over the LLM replicas (FastAPI through Serve).

The ingress tokenizes and validates, so a bad request is answered with a 4xx and an
OpenAI error body before any replica sees it. Every generation, streamed to the
client or not, goes through one path: a streaming call to a replica, resumed once
on another replica if the first dies (see `_job_stream`).

No `from __future__ import annotations` here: FastAPI reads the route signatures
(`request: Request`) at class decoration, and with string annotations inside a
Serve ingress class it took `request` for a query parameter.
"""

import asyncio
import concurrent.futures
import logging
import math
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.config import AppConfig
from deploy.openai_format import ResponseBuilder, sse
from deploy.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from deploy.request_plan import Job, Limits, Plan, check_model, plan_chat, plan_completion
from deploy.resilience import BACKPRESSURE, RETRYABLE, ReplicaAborted, describe

log = logging.getLogger("ray.serve")
app = FastAPI(title="DSLA-Serve", docs_url=None, redoc_url=None)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(APIError)
async def _api_error(_req, e: APIError):
    return _error_response(e)


@app.exception_handler(RequestValidationError)
async def _validation_error(_req, e: RequestValidationError):
    return JSONResponse(error_body(f"invalid request: {e.errors()[:1]}"), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_req, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    # e.headers: a 405's Allow, which RFC 9110 requires and Starlette's own response carries
    return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)


@app.exception_handler(Exception)
async def _internal_error(_req, e: Exception):
    log.exception("unhandled error in the ingress")
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


# Tokenizing a long prompt (and rendering a chat template over it) takes seconds of CPU: on the
# event loop that would stall every other stream of this ingress. One worker thread, so plans run
# in arrival order and the tokenizer never serves two of them at once.
_PLANNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan")


async def off_loop(fn, *args):
    """fn(*args) on the planning thread; the event loop serves other requests meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(_PLANNER, fn, *args)


def parse(model_cls, body: bytes):
    """Validate a JSON body; the first problem becomes a 400 naming the parameter."""
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"We could not parse the JSON body of your request: {err['msg']}") from None
        loc = [str(x) for x in err["loc"]]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        code = "missing_required_parameter" if err["type"] == "missing" else (
            "invalid_type" if err["type"].endswith(("_type", "_parsing")) else "invalid_value")
        raise APIError(400, f"{where}: {err['msg']}", "invalid_request_error", param, code) from None


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: dict, llm, controller):
        from transformers import AutoConfig, AutoTokenizer

        from dsla_model.engine.config import served_max_len
        from dsla_model.loading import DEFAULT_MODEL_NAME, resolve_model

        self.cfg = AppConfig.model_validate(config)
        self.llm, self.controller = llm, controller
        path = resolve_model(self.cfg.model)
        self.tok = AutoTokenizer.from_pretrained(path)
        mcfg = AutoConfig.from_pretrained(path)
        name = self.cfg.served_model_name or (DEFAULT_MODEL_NAME if self.cfg.model == "default" else self.cfg.model)
        self.limits = Limits(model_name=name, vocab_size=mcfg.vocab_size,
                             # the engine's own limit (a sliding window caps it), so both refuse alike
                             max_model_len=served_max_len(self.cfg.engine.engine_config(), mcfg),
                             max_tokens_limit=self.cfg.max_tokens_limit,
                             default_max_tokens=self.cfg.default_max_tokens, max_choices=self.cfg.max_choices)
        self.retry_after = str(max(1, math.ceil(self.cfg.replica.retry_after_s)))

    # -- routes ------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    def _model_card(self) -> dict:
        return {"id": self.limits.model_name, "object": "model", "created": 0, "owned_by": "dsla-serve",
                "root": self.cfg.model, "max_model_len": self.limits.max_model_len}

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str):
        check_model(model_id, self.limits)
        return self._model_card()

    @app.get("/status")
    async def status(self):
        """Per replica: DSLA layers, store version, queue, running requests, capacity."""
        resp = self.controller.snapshot.remote()
        try:  # Serve queues a call to a controller with no live replica without a deadline
            snap = await asyncio.wait_for(resp, self.cfg.controller.report_timeout_s)
        except (asyncio.TimeoutError, *RETRYABLE) as e:  # Serve is restarting the controller: a 503 to retry
            if isinstance(e, asyncio.TimeoutError) and hasattr(resp, "cancel"):
                resp.cancel()  # drop the queued call too
            why = "no answer" if isinstance(e, asyncio.TimeoutError) else describe(e)
            raise APIError(503, f"The conversion controller is unavailable ({why}); retry.", "server_error",
                           None, "service_unavailable", {"Retry-After": self.retry_after}) from None
        snap["model"] = self.limits.model_name
        return snap

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req = parse(CompletionRequest, await request.body())
        return await self._serve(await off_loop(plan_completion, req, self.tok, self.limits), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = parse(ChatCompletionRequest, await request.body())
        return await self._serve(await off_loop(plan_chat, req, self.tok, self.limits), request)

    # -- generation --------------------------------------------------------
    async def _serve(self, plan: Plan, request: Request):
        builder = ResponseBuilder(plan, self.limits.model_name, self.tok)
        events = self._merged(plan)
        if not plan.stream:
            try:
                async for index, ev in events:
                    builder.add(index, ev)
            except Exception as e:
                raise self._as_api_error(e) from None
            finally:  # also on cancellation (client gone): stop the replicas' work now
                await events.aclose()
            return builder.final()
        # Wait for every choice's first event before answering 200, so that backpressure or a
        # dead fleet meeting any of them still gets its status code, not an error inside a
        # stream that already answered 200 for the others.
        first, started = [], set()
        try:
            async for index, ev in events:
                first.append((index, ev))
                started.add(index)
                if len(started) == len(plan.jobs):
                    break
        except Exception as e:
            await events.aclose()
            raise self._as_api_error(e) from None
        return StreamingResponse(self._sse(builder, events, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, builder: ResponseBuilder, events, first):
        try:
            for index, ev in first:
                for chunk in builder.add(index, ev):
                    yield sse(chunk)
            async for index, ev in events:
                for chunk in builder.add(index, ev):
                    yield sse(chunk)
        except Exception as e:  # headers are gone: report in the stream, as OpenAI does
            yield sse(self._as_api_error(e).body())
            yield sse("[DONE]")  # as vLLM ends it: a client that reads to [DONE] stops here too
            return
        finally:
            await events.aclose()
        if builder.plan.include_usage:
            yield sse(builder.usage_chunk())
        yield sse("[DONE]")

    def _as_api_error(self, e: Exception) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, BACKPRESSURE):
            return APIError(429, "The server is at capacity; retry after a moment.", "rate_limit_error",
                            None, "rate_limit_exceeded", {"Retry-After": self.retry_after})
        if isinstance(e, ValueError):  # the engine refused the sampling parameters
            return APIError(400, str(e))
        if isinstance(e, RETRYABLE):
            return APIError(503, f"No replica could finish the request ({describe(e)}); retry.", "server_error",
                            None, "service_unavailable", {"Retry-After": self.retry_after})
        log.error("generation failed: %s", describe(e))
        return APIError(500, f"generation failed: {describe(e)}", "server_error")

    async def _merged(self, plan: Plan):
        """(choice index, event) from every job of the plan, as they come."""
        if len(plan.jobs) == 1:
            job = plan.jobs[0]
            async for batch in self._job_stream(job):
                for ev in batch:
                    yield job.index, ev
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(job: Job):
            try:
                async for batch in self._job_stream(job):
                    for ev in batch:
                        queue.put_nowait((job.index, ev))
                queue.put_nowait((job.index, None))
            except Exception as e:
                queue.put_nowait((job.index, e))

        tasks = [asyncio.create_task(pump(j)) for j in plan.jobs]
        try:
            left = len(tasks)
            while left:
                index, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()

    async def _job_stream(self, job: Job):
        """Event batches of one job. If its replica dies, the job resumes once on another
        replica from the tokens already produced (prompt + generated so far), so the
        client sees one uninterrupted answer."""
        prompt, params = list(job.prompt_ids), dict(job.params)
        generated: list[int] = []
        emitted = 0  # chars of text the client has
        for attempt in range(2):
            request_id = f"{uuid.uuid4().hex}-{job.index}"
            gen = self.llm.options(stream=True).generate.remote(prompt + generated, params, request_id)
            finished = False
            try:
                async for batch in gen:
                    out = []
                    for ev in batch:
                        if "error" in ev:  # the replica refused the request
                            raise APIError(ev["error"]["status"], ev["error"]["message"])
                        if ev.get("finish_reason") == "abort":
                            break
                        if ev.get("token_id") is not None:
                            generated.append(ev["token_id"])
                        # counts as the client asked: the original prompt, all tokens so far
                        ev["num_prompt_tokens"] = len(prompt)
                        ev["num_generated_tokens"] = len(generated)
                        emitted += len(ev.get("text") or "")
                        out.append(ev)
                    if out:
                        yield out
                    if len(out) < len(batch):
                        raise ReplicaAborted(f"request {request_id} aborted by its replica")
                    if out and out[-1].get("finish_reason") is not None:
                        # the answer is complete: a replica lost before its stream ends must not
                        # resume it (that would generate past the stop, or fail a finished request)
                        break
                finished = True
                return
            except RETRYABLE as e:
                left = job.params["max_tokens"] - len(generated)
                if attempt == 1 or left <= 0:
                    raise
                log.warning("replica lost during request %s (%s); resuming after %d tokens",
                            request_id, describe(e), len(generated))
                params["max_tokens"] = left
                # the new replica's text starts with what this one generated: what it held back as a
                # possible stop-string prefix comes out there, and a stop string can span the two
                params["resume_tokens"], params["resume_emitted_chars"] = len(generated), emitted
            finally:
                if not finished:  # the client went away or we gave up: free the engine slot
                    gen.cancel()
