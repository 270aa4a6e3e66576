"""The Python package against transformers' reference logits and tokens (committed fixtures,
made by scripts/make_model_fixtures.py and scripts/reference_default_model.py), and against the
engine's own definitions (greedy generation = argmax of the logits, trace = the attention it
records)."""

import json
import threading

import numpy as np
import pytest
from conftest import MODEL_FIXTURES, ROOT, fixture_cases, reference

import visikv


@pytest.mark.parametrize("case", fixture_cases())
def test_logits_equal_transformers(case):
    folder, info, expected = reference(case)
    model = visikv.Model.load(str(folder))
    logits = model.logits(info["tokens"])
    assert logits.dtype == np.float32
    assert logits.shape == expected.shape
    # The C++ model tests' tolerance: 1e-4 of the logits' scale.
    assert np.max(np.abs(logits - expected)) <= 1e-4 * info["logit_scale"]


@pytest.mark.parametrize("case", fixture_cases())
def test_tokens_equal_hf_tokenizers(case):
    folder, info, _ = reference(case)
    model = visikv.Model.load(str(folder))
    assert model.tokenize(info["text"]) == info["text_ids"]
    plain = info["text_ids_without_special_tokens"]
    assert model.tokenize(info["text"], add_special=False) == plain
    assert model.detokenize(plain) == info["text_decoded"]


def test_default_model_matches_transformers(default_model):
    ref = MODEL_FIXTURES / "smollm2_ref"
    info = json.loads((ref / "reference.json").read_text())
    tokens = json.loads((ref / "tokens.json").read_text())
    n, k = info["n_tokens"], info["top_k"]
    top_ids = np.fromfile(ref / "topk_ids.i32", dtype="<i4").reshape(n, k)
    top_logprobs = np.fromfile(ref / "topk_logprobs.f32", dtype="<f4").reshape(n, k)
    logits = default_model.logits(tokens).astype(np.float64)
    logprobs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    logprobs -= logits.max(1, keepdims=True)
    assert np.mean(np.argmax(logits, 1) == top_ids[:, 0]) >= 0.99
    ours = np.take_along_axis(logprobs, top_ids.astype(np.int64), 1)
    assert np.max(np.abs(ours[:, :8] - top_logprobs[:, :8])) < 0.05


def test_config_and_repr(default_model):
    c = default_model.config
    assert c["layers"] == 30 and c["heads"] == 9 and c["kv_heads"] == 3 and c["head_dim"] == 64
    assert c["vocab_size"] == 49152
    assert default_model.format == "gguf"
    assert "SmolLM2" in repr(default_model) or "llama" in repr(default_model)


def test_greedy_generation_follows_the_logits(default_model):
    prompt = default_model.tokenize("The capital of France is")
    generation = default_model.generate(prompt, 8, stop_at_eos=False)
    tokens = [t.id for t in generation]
    assert len(tokens) == 8 and generation.tokens == tokens
    logits = default_model.logits(prompt + tokens[:-1])
    # Token i is the argmax after the prompt and tokens[:i].
    expected = np.argmax(logits[len(prompt) - 1 :], axis=1)
    assert tokens == expected.tolist()


def test_streamed_text_is_the_detokenized_text(default_model):
    # Multi-byte characters split over byte-level tokens come out whole.
    generation = default_model.generate("Écris en français: café, crème, naïve", 24, stop_at_eos=False)
    pieces = list(generation)
    assert "".join(p.text for p in pieces) == default_model.detokenize([p.id for p in pieces])
    assert b"".join(p.bytes for p in pieces).decode("utf-8", "replace") == "".join(
        p.text for p in pieces
    )


def test_sampling_is_seeded(default_model):
    def run(seed):
        return [t.id for t in default_model.generate("Once upon a time", 12, temperature=0.9,
                                                      top_k=40, top_p=0.95, seed=seed,
                                                      stop_at_eos=False)]
    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("selector", ["dense", "sparse:a1:w8:k4:exact"])
def test_trace_reproduces_attention(selector):
    folder, info, _ = reference("llama")
    model = visikv.Model.load(str(folder))
    tokens = info["tokens"][:20]
    trace = model.trace(tokens, selector=selector)
    c = model.config
    assert [layer["layer"] for layer in trace["layers"]] == list(range(c["layers"]))
    np.testing.assert_array_equal(trace["logits"], model.logits(tokens, selector=selector))
    group = c["heads"] // c["kv_heads"]
    for layer in trace["layers"]:
        q, k, a = (layer[name].astype(np.float64) for name in ("q", "k", "attention"))
        assert q.shape == (20, c["heads"], c["head_dim"]) and a.shape == (c["heads"], 20, 20)
        for h in range(c["heads"]):
            for t in range(20):
                read = np.nonzero(a[h, t])[0]
                assert read.max() <= t  # causal
                scores = k[read, h // group] @ q[t, h] / np.sqrt(c["head_dim"])
                weights = np.exp(scores - scores.max())
                np.testing.assert_allclose(a[h, t, read], weights / weights.sum(), atol=2e-6)
                if selector == "dense":
                    assert len(read) == t + 1


def test_trace_of_chosen_layers(default_model):
    trace = default_model.trace(default_model.tokenize("Hello there, world")[:5], layers=[7, 2])
    assert [layer["layer"] for layer in trace["layers"]] == [7, 2]
    with pytest.raises(visikv.Error, match="layer 30 is out of range"):
        default_model.trace([1, 2], layers=[30])


def test_compressed_cache_changes_logits(default_model):
    tokens = default_model.tokenize(
        (ROOT / "README.md").read_text(encoding="utf-8")[:1500], add_special=False
    )[:200]
    exact = default_model.logits(tokens)
    two_bit = default_model.logits(tokens, keys="int2:g64:tok")
    f16 = default_model.logits(tokens, keys="f16", values="f16")
    assert np.max(np.abs(two_bit - exact)) > 0.1
    assert np.max(np.abs(f16 - exact)) < 0.05


def test_errors_name_the_problem(default_model, tmp_path):
    with pytest.raises(visikv.Error, match="no-such-model"):
        visikv.Model.load(str(tmp_path / "no-such-model.gguf"))
    with pytest.raises(visikv.Error, match="keys: "):
        default_model.logits([1, 2, 3], keys="int5:g16:tok")
    with pytest.raises(visikv.Error, match="selector: "):
        default_model.logits([1, 2, 3], selector="sparse:w-1")
    with pytest.raises(visikv.Error, match="numerics"):
        default_model.logits([1, 2, 3], numerics="fp8")
    with pytest.raises(visikv.Error, match="outside the vocabulary"):
        default_model.logits([1, 49152])
    with pytest.raises(visikv.Error, match="context"):
        default_model.generate([1] * 10, 10**9)
    with pytest.raises(visikv.Error, match="top_p"):
        default_model.generate("hi", 4, temperature=1.0, top_p=0.0)
    with pytest.raises(TypeError):
        default_model.logits("not tokens")


def test_computation_releases_the_gil(default_model):
    tokens = default_model.tokenize((ROOT / "README.md").read_text(encoding="utf-8"))[:384]
    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    thread = threading.Thread(target=count)
    thread.start()
    try:
        before = ticks
        default_model.logits(tokens)
        during = ticks - before
    finally:
        stop.set()
        thread.join()
    # Held through the call, the GIL would have stopped the counting thread.
    assert during > 1000


def test_chat_template_renders_the_conversation(default_model):
    messages = [{"role": "user", "content": "Hi there"}]
    text = default_model.apply_chat_template(messages)
    assert "Hi there" in text and text.endswith("<|im_start|>assistant\n")
    assert not default_model.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "assistant\n")
    folder = MODEL_FIXTURES / "llama"
    with pytest.raises(visikv.Error, match="chat template"):
        visikv.Model.load(str(folder)).apply_chat_template(messages)
