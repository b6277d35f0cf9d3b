"""An OpenAI-compatible HTTP server over generate.py's loop, for the tools people already use (the `openai`
client, chat front-ends, editors).

    python server.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth --port 8000 [--compile]
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Endpoints: POST /v1/chat/completions and /v1/completions (server-sent events with "stream": true),
GET /v1/models, GET /health (503 while the model loads or compiles, then 200).

One model serves one request at a time: requests wait in a queue, in arrival order, for the one worker
thread that owns the model. Its KV cache keeps what the last request left (generate.PromptCache), so a request
that shares a token prefix with it (the system prompt, the conversation so far: a chat front-end resends the
whole history every turn) prefills only the tokens after that prefix. A client that disconnects stops its
generation at the next token. Bad requests (invalid JSON, an unknown model, a field out of range, a prompt
longer than the KV cache) are answered with OpenAI's error object and status 400, never a traceback.

With --compile on a CPU the step is built in the background while requests decode eagerly (compiled_step.py);
one compiled greedy step serves every request: it also returns softmax(logits), from which a sampled request
draws its token with its own temperature, top-k and top-p.
"""
import asyncio
import collections
import json
import os
import queue
import secrets
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import cli
import compiled_step
import generate
import memory
from cli import ArgumentParser, UsageError
from sampling import sample
from tokenizer import StreamingDecoder, load_tokenizer

GREEDY = dict(temperature=0.0, top_k=None, top_p=1.0)  # the settings the one compiled step is built for
DEFAULT_CACHE = 2048  # KV cache positions when --max_seq_length is not given (capped by the model's context)
ROLES = ("system", "user", "assistant", "developer")


class RequestError(Exception):
    """A request that cannot be served: answered with OpenAI's error object."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


class Cancelled(Exception):
    """Raised in the decode loop's callback: the client went away, or a stop string was produced."""


# ---------------------------------------------------------------- requests


@dataclass
class Job:
    """One request for the worker: its prompt, how to sample, and where its events go (an asyncio queue of
    ("text", choice, str), ("finish", choice, reason), ("usage", dict), ("error", RequestError), ("done",))."""
    prompt_ids: list
    max_tokens: Optional[int]
    sampling: dict
    stop: list
    n: int
    seed: Optional[int]
    loop: asyncio.AbstractEventLoop
    ident: str = ""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's event loop has closed (shutting down): nobody is listening
            self.cancelled.set()


def number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}", name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' is {value}; it must be between {low} and {high}", name)
    return value


def parse_sampling(body: dict) -> tuple:
    """(sampling options, stop strings, n, seed, max_tokens) from the fields OpenAI's two endpoints share."""
    for name in ("frequency_penalty", "presence_penalty"):
        if number(body, name, 0, -2, 2):
            raise RequestError(f"'{name}' is not supported by this server; leave it at 0", name)
    for name in ("logprobs", "echo", "tools", "functions", "logit_bias", "suffix"):
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by this server", name)
    temperature = number(body, "temperature", 1.0, 0, 2)
    top_p = number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise RequestError("'top_p' must be greater than 0", "top_p")
    top_k = number(body, "top_k", None, 1, 1 << 31, integer=True)  # not OpenAI's, but llama.cpp's and vLLM's
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    n = number(body, "n", 1, 1, 16, integer=True)
    seed = number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = number({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 31, integer=True)
    if body.get("stream_options") is not None and not body.get("stream"):
        raise RequestError("'stream_options' is only allowed with 'stream': true", "stream_options")
    return dict(temperature=temperature, top_k=top_k, top_p=top_p), stop, n, seed, max_tokens


def message_text(message, index: int) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"messages[{index}] must be an object with a 'role' among {', '.join(ROLES)}",
                           f"messages[{index}]")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            raise RequestError(f"messages[{index}].content: only text parts are supported", f"messages[{index}].content")
        content = "".join(part.get("text", "") for part in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{index}].content must be a string or a list of text parts",
                           f"messages[{index}].content")
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": content}


class StopStrings:
    """The text of one choice as it streams: held back while it could be the start of a stop string, and cut
    at the first stop string (which is not sent), as OpenAI does."""

    def __init__(self, stops: list):
        self.stops, self.text, self.sent = stops, "", 0

    def push(self, piece: str) -> tuple:
        """(text that can be sent now, whether a stop string ended the choice)."""
        self.text += piece
        found = [i for i in (self.text.find(stop, max(0, self.sent - len(stop))) for stop in self.stops) if i >= 0]
        if found:
            end = min(found)
            out, self.sent = self.text[self.sent:end], end
            self.text = self.text[:end]
            return out, True
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if self.text.endswith(stop[:k])), default=0)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# ---------------------------------------------------------------- the model's worker


class AnySampling:
    """generate()'s `background` for a request: each token's step from the compiled step's source (a
    compiled_step.BackgroundCompile, or generate's compiled function), built for greedy decoding. Its second
    output is softmax(logits); a sampled request draws from it with its own settings (the log of it is the
    logits up to a constant), so one compiled step serves every temperature, top-k and top-p."""

    def __init__(self, source, sampling: dict):
        self.source, self.sampling = source, sampling

    def next_step(self):
        stage, step = self.source.next_step() if self.source is not None else ("eager", generate.decode_one_token)

        def greedy(model, x, input_pos, **_):  # a greedy request's top_k / top_p change nothing, so are not passed
            return step(model, x, input_pos, **GREEDY)

        def resampled(model, x, input_pos, **sampling):
            _, probs = step(model, x, input_pos, **GREEDY)
            return sample(probs.log()[:, None], **sampling)

        return stage, greedy if self.sampling["temperature"] <= 0 else resampled


class CompiledFunction:
    """What generate.compile_functions compiled (CUDA, torchrun, drafting), as a step source."""

    def next_step(self):
        return "compiled", generate.decode_one_token


class Engine:
    """The model, its tokenizer and KV cache, owned by one worker thread that serves the queued jobs."""

    def __init__(self, args):
        self.args = args
        self.jobs: queue.Queue = queue.Queue()
        self.state = "loading"  # -> "compiling" -> "ready", or "failed"
        self.failure: Optional[Exception] = None
        self.model = self.tokenizer = self.drafter = self.steps = None
        self.prompt_cache = generate.PromptCache()
        self.max_seq_length = 0
        self.on_failure = lambda: None
        self.log = collections.deque(maxlen=100)  # the last choices served: prompt, reused and new tokens, finish

    @property
    def model_name(self) -> str:
        return self.args.model_name or Path(self.args.checkpoint_path).resolve().parent.name

    def start(self):
        threading.Thread(target=self.work, name="model", daemon=True).start()

    def work(self):
        try:
            self.load()
        except Exception as error:  # reported by main as one line, exit 2 (a UsageError) or the exception itself
            self.state, self.failure = "failed", error
            self.on_failure()
            return
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.serve(job)

    def load(self):
        args = self.args
        device = torch.device(args.device)
        dtype = generate.DTYPES[args.dtype]
        generate.check_device(device, dtype)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        generate.streaming_without_compile(args)
        self.model = generate.load_model(args.checkpoint_path, device, dtype,
                                         kv_cache_dtype=generate.KV_CACHE_DTYPES[args.kv_cache_dtype],
                                         memory_budget=args.memory_budget)
        self.tokenizer = load_tokenizer(Path(args.checkpoint_path).parent)
        self.drafter = generate.load_drafter(args, self.model, self.tokenizer, device, None)
        context = self.model.args.max_position_embeddings
        self.max_seq_length = min(args.max_seq_length or DEFAULT_CACHE, context)
        models = [self.model, *(self.drafter.models if self.drafter is not None else [])]
        cached = [m for m in models if isinstance(m, generate.Transformer)]
        memory.check_cache_fits(cached, 1, self.max_seq_length, device)
        with torch.device(device):
            for m in cached:
                m.setup_caches(max_batch_size=1, max_seq_length=self.max_seq_length)
        print(f"Loaded {args.checkpoint_path} in {time.perf_counter() - start:.2f} s; KV cache of "
              f"{self.max_seq_length} positions", file=sys.stderr)
        if args.compile and generate.in_background_compile(args, device, None, self.drafter):
            command = generate.build_command(args, self.max_seq_length)
            self.steps = compiled_step.BackgroundCompile(self.model, args.checkpoint_path, 1, GREEDY,
                                                         args.compile_mode, command).start()
        elif args.compile:  # CUDA graphs, drafting: compiled before the first request, while /health says 503
            self.state = "compiling"
            generate.compile_functions(models, device, args.compile_prefill, self.drafter, args.compile_mode)
            compile_start = time.perf_counter()
            prompt = torch.tensor(self.tokenizer.encode("Hello"), device=device)
            generate.generate(self.model, prompt, 4, max_seq_length=self.max_seq_length, drafter=self.drafter,
                              background=AnySampling(CompiledFunction(), GREEDY), **GREEDY)
            print(f"Compilation time: {time.perf_counter() - compile_start:.2f} s", file=sys.stderr)
            self.steps = CompiledFunction()
        self.state = "ready"
        print(f"Ready: http://{args.host}:{args.port}/v1 serves {self.model_name}", file=sys.stderr, flush=True)

    def check_prompt(self, ids: list, param: str = "messages") -> int:
        """The most new tokens the KV cache has room for after this prompt; a prompt that leaves none is an error."""
        slack = self.drafter.slack if self.drafter is not None else 0
        room = self.max_seq_length - len(ids) - slack
        if not ids:
            raise RequestError("the prompt is empty", param)
        if room < 1:
            raise RequestError(f"the prompt is {len(ids)} tokens, but this server's KV cache holds "
                               f"{self.max_seq_length} positions (with room for at least one new token); shorten the "
                               "prompt or start the server with a larger --max_seq_length", param,
                               "context_length_exceeded")
        return room

    def serve(self, job: Job):
        if job.cancelled.is_set():
            return
        try:
            if job.seed is not None:
                torch.manual_seed(job.seed)
            completion_tokens = 0
            for choice in range(job.n):
                if job.cancelled.is_set():
                    break
                completion_tokens += self.serve_choice(job, choice)
            job.emit("usage", {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
                               "total_tokens": len(job.prompt_ids) + completion_tokens})
        except RequestError as error:
            job.emit("error", error)
        except Exception as error:  # a bug, not the request: the traceback goes to the server's log, not the client
            traceback.print_exc()
            job.emit("error", RequestError(f"internal error: {cli_line(error)}", status=500))
        finally:
            job.emit("done")

    def serve_choice(self, job: Job, choice: int) -> int:
        """Generate one choice, sending its text as it comes; the number of tokens it produced."""
        device = self.model.norm.weight.device
        room = self.check_prompt(job.prompt_ids)
        max_new = min(job.max_tokens or room, room)
        stop_ids = set(self.tokenizer.eos_ids)
        stream, stops = StreamingDecoder(self.tokenizer), StopStrings(job.stop)
        state = {"produced": 0, "finish": "length", "stop_string": False}

        def callback(token):
            if job.cancelled.is_set():
                raise Cancelled
            token = int(token[0, 0])
            if token in stop_ids:
                state["finish"] = "stop"
                return
            state["produced"] += 1
            text, stopped = stops.push(stream.push(token))
            if text:
                job.emit("text", choice, text)
            if stopped:
                state.update(finish="stop", stop_string=True)
                raise Cancelled

        prompt = torch.tensor(job.prompt_ids, dtype=torch.long, device=device)
        timings, start = {}, time.perf_counter()
        reused = self.prompt_cache.shared_prefix(job.prompt_ids)  # what generate() will reuse
        try:
            generate.generate(self.model, prompt, max_new, max_seq_length=self.max_seq_length, stop_ids=stop_ids,
                              callback=callback, timings=timings, drafter=self.drafter,
                              background=AnySampling(self.steps, job.sampling), prompt_cache=self.prompt_cache,
                              **job.sampling)
        except Cancelled:
            pass
        finish = state["finish"] if not job.cancelled.is_set() else "cancelled"
        steps = sorted(set(timings.get("stages") or ["eager" if self.steps is None else "compiled"]))
        entry = {"prompt": len(job.prompt_ids), "reused": reused, "new": state["produced"], "finish": finish,
                 "seconds": time.perf_counter() - start, "steps": steps}
        self.log.append(entry)
        print(f"{job.ident} choice {choice}: prompt {entry['prompt']} tokens ({reused} reused), {entry['new']} new "
              f"in {entry['seconds']:.2f} s ({'/'.join(steps)} step), {finish}", file=sys.stderr)
        rest = stops.flush()  # what was held back in case a stop string began there
        if rest and not state["stop_string"]:
            job.emit("text", choice, rest)
        job.emit("finish", choice, state["finish"])
        return state["produced"]


def cli_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


# ---------------------------------------------------------------- HTTP


def error_body(error: RequestError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": str(error), "type": kind, "param": error.param, "code": error.code}}


def create_app(engine: Engine):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="gpt-fast-native", docs_url=None, redoc_url=None)

    def error_response(error: RequestError):
        return JSONResponse(error_body(error), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown paths and methods, as OpenAI's error object
        return error_response(RequestError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code))

    @app.get("/health")
    async def health():
        if engine.state == "ready":
            return {"status": "ok"}
        return JSONResponse({"status": engine.state}, status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "gpt-fast-native"}]}

    async def read_body(request: Request) -> dict:
        if engine.state != "ready":
            raise RequestError(f"the model is {engine.state}; retry when GET /health answers 200", status=503)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as error:
            raise RequestError(f"the request body is not valid JSON ({error})") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != engine.model_name:
            raise RequestError(f"the model '{model}' does not exist; this server serves '{engine.model_name}' "
                               "(GET /v1/models)", "model", "model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise RequestError("'stream' must be true or false", "stream")
        return body

    def chat_prompt(body: dict) -> list:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of messages", "messages")
        messages = [message_text(m, i) for i, m in enumerate(messages)]
        try:
            return engine.tokenizer.apply_chat_template(messages)
        except Exception as error:  # the template's own raise_exception, e.g. roles out of order
            raise RequestError(f"the model's chat template refused these messages ({cli_line(error)})",
                               "messages") from None

    def completion_prompt(body: dict) -> list:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return engine.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < engine.model.args.vocab_size for t in prompt):
                raise RequestError("'prompt' has token ids outside the vocabulary", "prompt")
            return prompt
        raise RequestError("'prompt' must be a string, a list of one string, or a list of token ids", "prompt")

    async def complete(request: Request, chat: bool):
        try:
            body = await read_body(request)
            ids = chat_prompt(body) if chat else completion_prompt(body)
            sampling, stop, n, seed, max_tokens = parse_sampling(body)
            engine.check_prompt(ids, "messages" if chat else "prompt")
        except RequestError as error:
            return error_response(error)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        job = Job(ids, max_tokens, sampling, stop, n, seed, asyncio.get_running_loop(), ident)
        engine.jobs.put(job)
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": engine.model_name}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream_events(job, head, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole_response(request, job, head, chat)

    async def whole_response(request: Request, job: Job, head: dict, chat: bool):
        texts, reasons, usage = {}, {}, None
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return JSONResponse({}, status_code=499)
                continue
            if event[0] == "text":
                texts[event[1]] = texts.get(event[1], "") + event[2]
            elif event[0] == "finish":
                reasons[event[1]] = event[2]
            elif event[0] == "usage":
                usage = event[1]
            elif event[0] == "error":
                return error_response(event[1])
            elif event[0] == "done":
                break
        choices = []
        for index in sorted(reasons):
            text = texts.get(index, "")
            content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append({"index": index, **content, "logprobs": None, "finish_reason": reasons[index]})
        return {**head, "choices": choices, "usage": usage}

    async def stream_events(job: Job, head: dict, chat: bool, include_usage: bool):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(choices, **extra) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        def choice(index, text=None, reason=None, role=False):
            if not chat:
                return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

        started = set()
        try:
            while True:
                event = await job.events.get()
                if event[0] in ("text", "finish") and chat and event[1] not in started:
                    started.add(event[1])
                    yield chunk([choice(event[1], role=True)])
                if event[0] == "text":
                    yield chunk([choice(event[1], text=event[2])])
                elif event[0] == "finish":
                    yield chunk([choice(event[1], reason=event[2])])
                elif event[0] == "usage" and include_usage:
                    yield chunk([], usage=event[1])
                elif event[0] == "error":
                    yield f"data: {json.dumps(error_body(event[1]))}\n\n"
                elif event[0] == "done":
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client went away (the response is cancelled) or the stream ended: either way stop generating
            job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


# ---------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    generate.add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--model_name", default=None,
                        help="the model's id in requests and /v1/models (default: the checkpoint's folder name)")
    args = parser.parse_args(argv)
    checks = generate.model_argument_checks(args) + [
        (not 0 <= args.port < 65536, "--port must be between 0 and 65535"),
        (args.compile_prefill, "--compile_prefill is not supported by the server; drop it"),
    ]
    for failed, message in checks:
        if failed:
            parser.error(message)
    # What generate's helpers read for one process serving one sequence with the greedy compiled step.
    args.batch_size, args.temperature, args.top_k, args.top_p = 1, 0.0, None, 1.0
    return args


def serve(args):
    import uvicorn

    if not Path(args.checkpoint_path).exists():
        raise UsageError(f"checkpoint {args.checkpoint_path} not found; convert one with convert_hf_checkpoint.py "
                         "or pass --checkpoint_path")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:  # uvicorn would exit 1 with its own log lines
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
        except OSError as error:
            raise UsageError(f"cannot listen on {args.host}:{args.port} ({error.strerror}); choose another --port "
                             "or --host") from None
    engine = Engine(args)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host=args.host, port=args.port, log_level="warning"))
    engine.on_failure = lambda: setattr(server, "should_exit", True)
    engine.start()
    print(f"Listening on http://{args.host}:{args.port} (GET /health is 503 until the model is ready)", file=sys.stderr,
          flush=True)
    try:
        server.run()
    finally:
        if isinstance(engine.steps, compiled_step.BackgroundCompile):
            engine.steps.stop()  # what it finished stays saved
        if engine.state in ("loading", "compiling"):  # stopped (Ctrl-C) while the worker is inside torch's loading
            print("\ninterrupted", file=sys.stderr, flush=True)  # code, which a thread cannot be stopped in
            os._exit(cli.INTERRUPTED_EXIT_CODE)
    if engine.failure is not None:
        raise engine.failure


def main(argv=None):
    args = parse_args(argv)
    cli.run(lambda _: serve(args))


if __name__ == "__main__":
    main()
