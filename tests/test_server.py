"""The OpenAI-compatible server (server.py) through the real `openai` client, and the KV cache reuse it shares
with the multi-turn --interactive chat (generate.PromptCache).

Most tests run a tiny random Llama that has SmolLM2's real tokenizer and chat template (its vocabulary size),
so that they are fast; one compares the real SmolLM2's answer with generate.py's."""
import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import generate
import server
from conftest import ROOT, build_hf_model
from convert_hf_checkpoint import convert
from tokenizer import load_tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(smollm2_checkpoint, tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's vocabulary, tokenizer, chat template and EOS id."""
    from transformers import LlamaConfig

    tokenizer = load_tokenizer(smollm2_checkpoint.parent)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=tokenizer.vocab_size, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("tiny-chat")
    build_hf_model(config, seed=3).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (smollm2_checkpoint.parent / name).exists():
            shutil.copy(smollm2_checkpoint.parent / name, folder / name)
    return convert(checkpoint_dir=folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(checkpoint, *flags, hold_loading: threading.Event = None):
    """server.py's app and engine in this process (uvicorn in a thread): (base url, engine). hold_loading: the
    model is not loaded until it is set."""
    port = free_port()
    args = server.parse_args(["--checkpoint_path", str(checkpoint), "--port", str(port), "--dtype", "float32",
                              *map(str, flags)])
    engine = server.Engine(args)
    if hold_loading is not None:
        load = engine.load
        engine.load = lambda: (hold_loading.wait(60), load())
    web = uvicorn.Server(uvicorn.Config(server.create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    engine.start()
    deadline = time.time() + 30
    while not web.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        web.should_exit = True
        engine.jobs.put(None)
        thread.join(10)


def wait_ready(url: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if get(url + "/health")[0] == 200:
            return
        time.sleep(0.1)
    raise AssertionError("the server never became ready")


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(url: str, body) -> tuple:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tiny_server(tiny_chat_checkpoint):
    with running_server(tiny_chat_checkpoint) as (url, engine):
        wait_ready(url)
        yield url, engine


def greedy_text(model, tokenizer, ids: list, max_new_tokens: int) -> tuple:
    """The oracle: generate.generate from scratch, cut at EOS: (text, token count)."""
    out = generate.generate(model, torch.tensor(ids), max_new_tokens, stop_ids=tokenizer.eos_ids)
    new = generate.until_stop(out[0, len(ids):].tolist(), tokenizer.eos_ids)
    return tokenizer.decode(new), len(new)


# ---------------------------------------------------------------- pieces


def test_stop_strings_hold_back_and_cut():
    stops = server.StopStrings(["END", "\n\n"])
    sent = []
    for piece in ["Hello E", "N", "ough, th", "e E", "ND and more"]:
        text, stopped = stops.push(piece)
        sent.append(text)
        if stopped:
            break
    assert stopped and "".join(sent) == "Hello ENough, the "
    assert sent[:2] == ["Hello ", ""]  # "E" and then "EN" could begin "END": held back until they cannot
    free = server.StopStrings([])
    assert free.push("abc") == ("abc", False) and free.flush() == ""
    held = server.StopStrings(["xyz"])
    assert held.push("abx") == ("ab", False) and held.flush() == "x"


def test_prompt_cache_prefills_only_the_new_tokens(tiny_models):
    """A prompt that extends what the cache holds gives exactly the tokens of a run from scratch, prefilling only
    the tokens after the shared prefix; a prompt that diverges reuses what it shares."""
    _, _, checkpoint = tiny_models["qwen2"]  # sliding window: positions past the window are reused too
    model = generate.load_model(checkpoint, "cpu", torch.float32)
    first = torch.arange(5, 25)
    cache = generate.PromptCache()
    timings = {}
    out1 = generate.generate(model, first, 12, max_seq_length=128, prompt_cache=cache, timings=timings)
    assert timings["reused_tokens"] == 0 and cache.ids == out1[0, :-1].tolist()
    second = torch.cat([out1[0], torch.tensor([7, 8, 9])])  # the next turn: prompt + answer + new text
    out2 = generate.generate(model, second, 10, max_seq_length=128, prompt_cache=cache, timings=timings)
    assert timings["reused_tokens"] == len(out1[0]) - 1
    fresh = generate.load_model(checkpoint, "cpu", torch.float32)
    assert torch.equal(out2, generate.generate(fresh, second, 10, max_seq_length=128))
    third = torch.cat([first[:10], torch.tensor([1, 2, 3])])
    out3 = generate.generate(model, third, 6, max_seq_length=128, prompt_cache=cache, timings=timings)
    assert timings["reused_tokens"] == 10
    assert torch.equal(out3, generate.generate(fresh, third, 6, max_seq_length=128))
    generate.generate(model, third, 6, max_seq_length=96, prompt_cache=cache, timings=timings)
    assert timings["reused_tokens"] == 0  # a new cache holds nothing


def test_prompt_cache_after_a_stopped_generation(tiny_models):
    """A callback that stops the loop (a client gone, a stop string) leaves the cache knowing what it holds."""
    _, _, checkpoint = tiny_models["llama"]
    model = generate.load_model(checkpoint, "cpu", torch.float32)
    cache, seen = generate.PromptCache(), []

    def stop_at_five(token):
        seen.append(int(token))
        if len(seen) == 5:
            raise server.Cancelled

    with pytest.raises(server.Cancelled):
        generate.generate(model, torch.arange(3, 13), 20, max_seq_length=64, prompt_cache=cache, callback=stop_at_five)
    assert cache.ids == list(range(3, 13)) + seen[:4]
    follow = torch.tensor(cache.ids + [seen[4], 9])
    out = generate.generate(model, follow, 5, max_seq_length=64, prompt_cache=cache)
    fresh = generate.load_model(checkpoint, "cpu", torch.float32)
    assert torch.equal(out, generate.generate(fresh, follow, 5, max_seq_length=64))


# ---------------------------------------------------------------- the server


def test_health_is_503_until_the_model_is_loaded(tiny_chat_checkpoint):
    hold = threading.Event()
    with running_server(tiny_chat_checkpoint, hold_loading=hold) as (url, engine):
        status, body = get(url + "/health")
        assert status == 503 and body == {"status": "loading"}
        status, body = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and "retry when GET /health answers 200" in body["error"]["message"]
        hold.set()
        wait_ready(url)
        assert get(url + "/health") == (200, {"status": "ok"})
        status, body = get(url + "/v1/models")
        assert status == 200 and [m["id"] for m in body["data"]] == [tiny_chat_checkpoint.parent.name]


def test_chat_and_completion_streamed_and_not(tiny_server, tiny_chat_checkpoint):
    """At temperature 0 both endpoints give generate()'s greedy text, streamed or not; usage counts are the
    tokenizer's prompt tokens and the tokens generated."""
    url, engine = tiny_server
    api, name = client(url), engine.model_name
    tokenizer = load_tokenizer(tiny_chat_checkpoint.parent)
    model = generate.load_model(tiny_chat_checkpoint, "cpu", torch.float32)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    ids = tokenizer.apply_chat_template(messages)
    expected, count = greedy_text(model, tokenizer, ids, 12)

    reply = api.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == ("length" if count == 12 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), count)
    assert reply.usage.total_tokens == len(ids) + count

    chunks = list(api.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count

    prompt = "The quick brown fox"
    expected, count = greedy_text(model, tokenizer, tokenizer.encode(prompt), 10)
    completion = api.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0)
    assert completion.object == "text_completion" and completion.choices[0].text == expected
    assert completion.usage.prompt_tokens == len(tokenizer.encode(prompt))
    streamed = list(api.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_a_new_turn_reuses_the_conversation_in_the_kv_cache(tiny_server, tiny_chat_checkpoint):
    url, engine = tiny_server
    api, name = client(url), engine.model_name
    tokenizer = load_tokenizer(tiny_chat_checkpoint.parent)
    model = generate.load_model(tiny_chat_checkpoint, "cpu", torch.float32)
    history = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "A fruit?"}]
    first = api.chat.completions.create(model=name, messages=history, max_tokens=6, temperature=0)
    cached = list(engine.prompt_cache.ids)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And a vegetable?"}]
    second = api.chat.completions.create(model=name, messages=history, max_tokens=6, temperature=0)
    ids = tokenizer.apply_chat_template(history)
    shared = next(i for i, (a, b) in enumerate(zip(cached + [-1], ids)) if a != b)
    assert engine.log[-1]["reused"] == shared > len(tokenizer.apply_chat_template(history[:2]))
    assert second.choices[0].message.content == greedy_text(model, tokenizer, ids, 6)[0]


def test_sampling_seed_stop_and_n(tiny_server):
    url, engine = tiny_server
    api, name = client(url), engine.model_name
    messages = [{"role": "user", "content": "Tell me a story."}]
    sampled = [api.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=1.0, top_p=0.9,
                                           seed=7, n=2) for _ in range(2)]
    texts = [[c.message.content for c in reply.choices] for reply in sampled]
    assert texts[0] == texts[1] and len(texts[0]) == 2  # the same seed: the same choices
    assert texts[0][0] != texts[0][1]  # two draws, not one answer twice
    assert [c.index for c in sampled[0].choices] == [0, 1]
    greedy = api.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0).choices[0]
    cut = greedy.message.content[3:6]
    assert cut and cut.strip() == cut  # a piece of the answer as the stop string
    stopped = api.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0, stop=[cut])
    assert stopped.choices[0].message.content == greedy.message.content[:greedy.message.content.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_four_concurrent_clients_each_get_their_own_answer(tiny_server, tiny_chat_checkpoint):
    url, engine = tiny_server
    name = engine.model_name
    questions = [f"Question number {i}: what comes after {i}?" for i in range(4)]
    alone = [client(url).chat.completions.create(model=name, messages=[{"role": "user", "content": q}], max_tokens=8,
                                                 temperature=0).choices[0].message.content for q in questions]
    answers = [None] * 4

    def ask(i):
        stream = client(url).chat.completions.create(model=name, messages=[{"role": "user", "content": questions[i]}],
                                                     max_tokens=8, temperature=0, stream=i % 2 == 0)
        if i % 2 == 0:
            answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            answers[i] = stream.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == alone


def test_a_client_that_disconnects_frees_the_model(tiny_server):
    url, engine = tiny_server
    name = engine.model_name
    body = {"model": name, "messages": [{"role": "user", "content": "Talk for a long time."}], "max_tokens": 3000,
            "temperature": 0, "stream": True}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    assert response.readline().startswith(b"data: ")
    response.close()  # gone mid-stream
    start = time.time()
    reply = client(url).chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                                temperature=0)
    assert reply.choices[0].message.content is not None and time.time() - start < 60
    gone = [entry for entry in engine.log if entry["finish"] == "cancelled"]
    assert gone and gone[-1]["new"] < 3000


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 400, "'gpt-4' does not exist"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "'temperature' is 3"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "'n' is 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "'max_tokens' must be an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "'top_p' must be greater than 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop' must be"),
    ({"messages": []}, 400, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0] must be an object with a 'role'"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "KV cache holds 2048 positions"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1}, 400, "not supported"),
    ([1, 2], 400, "must be a JSON object"),
], ids=["bad-json", "unknown-model", "temperature", "n", "max-tokens-type", "top-p", "stop", "no-messages", "role",
        "too-long", "penalty", "not-object"])
def test_bad_requests_get_openai_error_objects(tiny_server, body, status, words):
    url, _ = tiny_server
    code, reply = post(url + "/v1/chat/completions", body)
    assert code == status and set(reply) == {"error"}
    assert words in reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in json.dumps(reply)


def test_openai_client_sees_errors_as_bad_requests(tiny_server):
    url, engine = tiny_server
    with pytest.raises(openai.BadRequestError) as error:
        client(url).chat.completions.create(model=engine.model_name, messages=[{"role": "user", "content": "x " * 3000}])
    assert error.value.code == "context_length_exceeded"
    assert get(url + "/v2/nothing")[0] == 404
    assert get(url + "/health")[0] == 200  # still serving


def test_server_cli_bad_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "server.py"), "--checkpoint_path", str(tmp_path / "model.pth")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "not found" in result.stderr
    (tmp_path / "model.pth").write_text("not a checkpoint")
    result = subprocess.run([sys.executable, str(ROOT / "server.py"), "--checkpoint_path", str(tmp_path / "model.pth"),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")], result.stderr


@pytest.mark.slow
def test_smollm2_server_answers_as_generate_does(smollm2_checkpoint):
    """The real model, served as a subprocess (python server.py): at temperature 0 its answer is generate.py's."""
    question = "What is the capital of France?"
    cli = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(smollm2_checkpoint),
                          "--chat", "--prompt", question, "--dtype", "float32", "--max_new_tokens", "24"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--checkpoint_path", str(smollm2_checkpoint),
                                "--dtype", "float32", "--port", str(port)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if get(url + "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        name = get(url + "/v1/models")[1]["data"][0]["id"]
        reply = client(url).chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                    max_tokens=24, temperature=0)
        assert reply.choices[0].message.content == cli.stdout.rstrip("\n")
        assert "Paris" in reply.choices[0].message.content
    finally:
        process.terminate()
        process.wait(30)


# ---------------------------------------------------------------- multi-turn --interactive


@pytest.mark.slow
def test_interactive_chat_keeps_the_history(smollm2_checkpoint, monkeypatch, capsys):
    """Three turns on stdin: each turn's prompt holds the turns before it, only the new tokens are prefilled, and
    each answer is what a one-shot generation of the whole conversation so far gives."""
    import io

    turns = ["What is the capital of France?", "And of Germany?", "Which of the two is larger?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    generate.main(["--checkpoint_path", str(smollm2_checkpoint), "--chat", "--interactive", "--dtype", "float32",
                   "--max_new_tokens", "20"])
    out, err = capsys.readouterr()

    tokenizer = load_tokenizer(smollm2_checkpoint.parent)
    model = generate.load_model(smollm2_checkpoint, "cpu", torch.float32)
    history, expected, reused, cached = [], [], [], []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        ids = tokenizer.apply_chat_template(history)
        full = generate.generate(model, torch.tensor(ids), 20, max_seq_length=1024, stop_ids=tokenizer.eos_ids)
        new = full[0, len(ids):].tolist()
        shared = next((i for i, (a, b) in enumerate(zip(cached, ids)) if a != b), min(len(cached), len(ids) - 1))
        reused.append(shared)
        cached = ids + new[:-1]
        answer = tokenizer.decode(generate.until_stop(new, tokenizer.eos_ids))
        expected.append(answer)
        history.append({"role": "assistant", "content": answer})
    assert out == "".join(answer + "\n" for answer in expected)
    assert "Paris" in expected[0] and "Berlin" in expected[1]
    counts = [int(m) for m in re.findall(r"(\d+) reused from the KV cache", err)]
    assert counts == reused[1:] and all(count > 0 for count in counts), err


def test_conversation_drops_its_oldest_turns_when_it_outgrows_the_cache(tiny_chat_checkpoint):
    tokenizer = load_tokenizer(tiny_chat_checkpoint.parent)
    conversation = generate.Conversation(tokenizer, system="Be brief.")
    for turn in range(3):
        ids, dropped = conversation.prompt(f"Question {turn}: " + "tell me more " * 10, room=10_000)
        assert dropped == 0
        conversation.answered("An answer " * 5)
    whole = len(ids)
    ids, dropped = conversation.prompt("And the last one?", room=whole // 2)
    assert dropped >= 1 and len(ids) <= whole // 2
    text = tokenizer.decode(ids)
    assert "Be brief." in text and "And the last one?" in text and "Question 0" not in text
    ids, dropped = conversation.prompt("x " * 50, room=5)  # the newest message alone is kept, whatever its length
    assert len(conversation.turns) == 1 and len(ids) > 5
