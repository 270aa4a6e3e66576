"""`visikv serve` with the official openai client on loopback: completions, streaming, errors,
client disconnects, KV memory per sequence in /metrics, and a bounded concurrent load."""

import json
import re
import subprocess
import threading
import time
import urllib.request

import openai
import pytest
from conftest import ROOT

import visikv

BINARY = ROOT / "build" / "visikv"


class Server:
    def __init__(self, *args):
        self.process = subprocess.Popen(
            [str(BINARY), "-t", "2", "serve", *args, "--port", "0"],
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stderr.readline()
        match = re.search(r"on http://([\d.]+):(\d+)", line)
        assert match, line + self.process.stderr.read()
        self.url = f"http://{match[1]}:{match[2]}"
        self.model_id = line.split("visikv serve: ")[1].split(" on ")[0]
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read().decode()

    def metrics(self):
        values = {}
        for line in self.get("/metrics").splitlines():
            if line and not line.startswith("#"):
                name, value = line.split()
                values[name] = float(value)
        return values

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = Server("default")
    yield s
    s.close()


def test_health_models_and_metrics(server):
    assert json.loads(server.get("/health")) == {"status": "ok"}
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.model_id]
    assert "visikv_active_sequences" in server.metrics()


def test_greedy_completion_is_the_engines_generation(server, default_model):
    prompt = "The capital of France is"
    response = server.client.completions.create(
        model=server.model_id, prompt=prompt, max_tokens=12, temperature=0
    )
    # `serve` computes with the int16 numerics by default.
    expected = "".join(
        t.text for t in default_model.generate(prompt, 12, stop_at_eos=False, numerics="int16")
    )
    choice = response.choices[0]
    assert choice.text == expected
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(default_model.tokenize(prompt))
    assert response.usage.completion_tokens == 12


def test_streaming_gives_the_same_text(server):
    kwargs = dict(model=server.model_id, prompt="Once upon a time", max_tokens=20, temperature=0)
    whole = server.client.completions.create(**kwargs).choices[0].text
    chunks = list(server.client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stop_strings_and_sampling(server):
    kwargs = dict(model=server.model_id, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0)
    free = server.client.completions.create(**kwargs).choices[0].text
    stop = free[4:6]
    stopped = server.client.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.text == free[: free.index(stop)] and stopped.finish_reason == "stop"
    sampled = dict(model=server.model_id, prompt="Once", max_tokens=16, temperature=1.0, seed=3)
    first = server.client.completions.create(**sampled).choices[0].text
    assert server.client.completions.create(**sampled).choices[0].text == first


def test_bad_requests_get_openai_errors(server):
    c, model = server.client, server.model_id
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model=model, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model=model, prompt=[1] * 8190, max_tokens=16)
    with pytest.raises(openai.BadRequestError, match="visikv.keys"):
        c.completions.create(model=model, prompt="x", extra_body={"visikv": {"keys": "int5"}})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=model, prompt="x", temperature="hot")
    for body, status in [(b"{not json", 400), (b"[]", 400), (b"x" * (2 << 20), 413)]:
        request = urllib.request.Request(server.url + "/v1/completions", data=body)
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        assert error.value.code == status
        assert "message" in json.loads(error.value.read())["error"]
    assert server.process.poll() is None  # still serving


def wait_until(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_client_disconnect_cancels_generation(server):
    before = server.metrics()["visikv_generated_tokens_total"]
    stream = server.client.completions.create(
        model=server.model_id, prompt="Tell me a long story.", max_tokens=2000, temperature=0,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert wait_until(lambda: server.metrics()["visikv_active_sequences"] == 0)
    assert server.metrics()["visikv_generated_tokens_total"] - before < 500


def kv_bytes_while_streaming(server, keys, values):
    stream = server.client.completions.create(
        model=server.model_id, prompt="The history of the city", max_tokens=400, temperature=0,
        stream=True, extra_body={"visikv": {"keys": keys, "values": values}},
    )
    seen = []
    for i, _ in enumerate(stream):
        if i == 40:
            seen.append(server.metrics())
            break
    stream.close()
    wait_until(lambda: server.metrics()["visikv_active_sequences"] == 0)
    return seen[0]


def test_metrics_show_kv_memory_per_sequence(server, default_model):
    f16 = kv_bytes_while_streaming(server, "f16", "f16")
    int4 = kv_bytes_while_streaming(server, "int4:g32:tok", "int4:g32:tok")
    assert f16["visikv_active_sequences"] == 1 and f16["visikv_kv_cache_tokens"] >= 40
    c = default_model.config
    # Per token: layers x KV heads x head_dim, keys and values, 2 bytes each in f16; 4 bits plus
    # an fp16 scale and zero per 32 values (5 bits) in int4.
    f16_per_token = c["layers"] * c["kv_heads"] * c["head_dim"] * 2 * 2
    assert f16["visikv_kv_cache_bytes"] == f16_per_token * f16["visikv_kv_cache_tokens"]
    assert int4["visikv_kv_cache_bytes"] == f16_per_token * 5 // 16 * int4["visikv_kv_cache_tokens"]
    assert f16["visikv_kv_cache_bytes_per_sequence"] == f16["visikv_kv_cache_bytes"]


def test_concurrent_clients_all_succeed(server):
    failures, latencies = [], []

    def client(worker):
        for i in range(2):
            started = time.monotonic()
            try:
                r = server.client.completions.create(
                    model=server.model_id, prompt=f"Client {worker} asks {i}:", max_tokens=8,
                    temperature=0.7, seed=worker * 100 + i,
                )
                assert r.usage.completion_tokens >= 1
                latencies.append(time.monotonic() - started)
            except Exception as error:  # noqa: BLE001 - every failure counts
                failures.append(repr(error))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(latencies) == 32


def test_chat_completions(server, default_model):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a French city."},
    ]
    prompt = default_model.tokenize(default_model.apply_chat_template(messages), add_special=False)
    expected = "".join(t.text for t in default_model.generate(prompt, 10))
    response = server.client.chat.completions.create(
        model=server.model_id, messages=messages, max_tokens=10, temperature=0
    )
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == len(prompt)
    chunks = list(server.client.chat.completions.create(
        model=server.model_id, messages=messages, max_tokens=10, temperature=0, stream=True
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    with pytest.raises(openai.BadRequestError, match="messages"):
        server.client.chat.completions.create(model=server.model_id, messages=[], max_tokens=4)


def test_a_model_without_a_chat_template_serves_completions_only():
    folder = ROOT / "tests" / "fixtures" / "models" / "llama"
    s = Server(str(folder))
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            s.client.chat.completions.create(
                model=s.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert s.client.completions.create(model=s.model_id, prompt="hi", max_tokens=3).choices
    finally:
        s.close()
