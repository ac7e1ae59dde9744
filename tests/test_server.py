"""A real server (uvicorn in a subprocess, the embedded default model) spoken to by the official `openai` client and by
raw HTTP: completions equal `earlyexit.complete`'s, streams equal completions, stop strings, every error path, the
API key, rows freed when a client disconnects, 429 when full."""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-123"
MODEL = "earlyexit-default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "EARLYEXIT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "earlyexit.serve", "--port", str(port), "--max-rows", "2", "--max-queue", "1",
                             "--max-body-bytes", "65536", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the server did not answer /health within 120 s")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def local():
    """The same model and policy in this process, as the CLI builds them."""
    from earlyexit.cli import build_policy
    from earlyexit.runtime.loading import DEFAULT_MODEL_DIR, load_runtime_model

    model, tok = load_runtime_model()
    flags = argparse.Namespace(mode=None, exit_threshold=None, stop_threshold=None, target_agreement=None, exit_layers=None,
                               max_draft=None, draft=None)
    return model, tok, build_policy(flags, model, DEFAULT_MODEL_DIR)


def post(server, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server + "/v1/completions", headers=headers, timeout=120, **kw,
                      **({"json": body} if not isinstance(body, (bytes, str)) else {"content": body}))


def health(server):
    return httpx.get(server + "/health", timeout=10).json()


PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main(", "class Stack:\n    def __init__(self):\n"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_completion_is_what_earlyexit_complete_writes(client, local, prompt):
    from earlyexit.runtime.decoding import GenerationSettings, complete
    from earlyexit.runtime.ngram_cache import DEFAULT_WEIGHT

    model, tok, policy = local
    settings = GenerationSettings(max_new_tokens=24, token_healing=True, stop_on_repetition=True, stop_strings=("\n\n\n",),
                                  cache_weight=DEFAULT_WEIGHT)  # the server's defaults are the CLI's
    alone = complete(model, tok, prompt, settings, policy=policy)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop="\n\n\n",
                                  extra_body={"earlyexit": {"exit_layers": True}})
    choice = r.choices[0]
    assert choice.text == alone.text
    assert r.usage.completion_tokens == len(alone.token_ids) and r.usage.prompt_tokens == alone.prompt_tokens
    ext = choice.model_extra["earlyexit"]
    assert ext["exit_layers"] == alone.exit_layers and ext["finish_reason"] == alone.finish_reason
    assert choice.finish_reason == ("length" if alone.finish_reason == "max_tokens" else "stop")


def test_a_stream_sends_the_completion_token_by_token(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text and len([t for t in texts if t]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": MODEL, "prompt": "x = ", "max_tokens": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_echo_and_a_list_of_prompts(client):
    r = client.completions.create(model=MODEL, prompt=["def add(a, b):\n", "for i in range(10):\n"], max_tokens=40, stop=["\n"],
                                  echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    for c, p in zip(r.choices, ["def add(a, b):\n", "for i in range(10):\n"]):
        assert c.text.startswith(p) and "\n" not in c.text[len(p):]


def test_sampling_repeats_by_seed(client):
    def draw(seed):
        return client.completions.create(model=MODEL, prompt="def main():\n", max_tokens=16, temperature=1.2, seed=seed).choices[0].text

    assert draw(5) == draw(5)
    assert len({draw(s) for s in range(4)}) > 1


@pytest.mark.parametrize("body, status, words", [
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 600}, 400, "context"),
    ({"model": MODEL, "prompt": "x " * 2000, "max_tokens": 16}, 400, "leaves room"),
    ({"model": MODEL, "prompt": ["x"] * 17}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "earlyexit": {"exit_threshold": 1.5}}, 400, "exit_threshold"),
    ({"model": MODEL, "prompt": "x", "earlyexit": {"speed": "max"}}, 400, "speed"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "not served"),
    (b"{not json", 400, "json"),
    (b"[1, 2]", 400, "input"),
])
def test_bad_requests_get_an_openai_error_naming_the_problem(server, body, status, words):
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words.lower() in error["message"].lower() and "\n" not in error["message"]
    assert set(error) >= {"message", "type", "code"}


def test_a_body_past_the_limit_is_refused(server):
    r = post(server, {"model": MODEL, "prompt": "x" * 70000})
    assert r.status_code == 413 and "65,536" in r.json()["error"]["message"]


def test_the_api_key_is_required_and_checked(server):
    assert post(server, {"model": MODEL, "prompt": "x"}, key=None).status_code == 401
    assert post(server, {"model": MODEL, "prompt": "x"}, key="wrong").status_code == 401
    assert httpx.get(server + "/v1/models", timeout=10).status_code == 401
    models = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert health(server)["status"] == "ok"  # open: a load balancer's probe has no key


LONG = {"model": MODEL, "prompt": "x = [", "max_tokens": 400, "stream": True,
        "earlyexit": {"repetition_stop": False, "stop_threshold": 1.0}}


def test_a_client_that_disconnects_frees_its_row(server):
    before = health(server)["cancelled"]
    with httpx.stream("POST", server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json=LONG, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.time() + 30
    while time.time() < deadline and (health(server)["running"] or health(server)["cancelled"] == before):
        time.sleep(0.05)
    assert health(server)["running"] == 0 and health(server)["cancelled"] == before + 1


def test_concurrent_clients_batch_and_a_full_server_answers_429(server, client):
    started, release = threading.Barrier(3), threading.Event()
    results = {}

    def hold(i):  # occupy a row (2) or the queue (1) until told to go
        with httpx.stream("POST", server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json=LONG, timeout=60) as r:
            results[i] = r.status_code
            started.wait(30)
            release.wait(60)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # in order: two rows, then the queue
    try:
        r = post(server, {"model": MODEL, "prompt": "x", "max_tokens": 4})
        assert r.status_code == 429 and "busy" in r.json()["error"]["message"]
        assert health(server)["mean_batch"] > 1
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert list(results.values()) == [200, 200, 200]


@pytest.mark.parametrize("mode", ["full", "early-exit", "lossless"])
def test_the_server_builds_its_policy_in_every_mode(mode):
    """build_service reads the CLI's build_policy, which reads flags the server does not offer (lossless' --draft-layers)."""
    from earlyexit.serve import build_parser, build_service
    from earlyexit.runtime.speculative import Lossless

    service = build_service(build_parser().parse_args(["--mode", mode]))
    assert isinstance(service.policy, Lossless) == (mode == "lossless")
