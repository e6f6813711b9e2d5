"""The content filter's parts without a server: Azure's shapes, the severity mapping and
calibration of the embedded heads, the moderation and guard mappings, the texts judged, the
engine hook with an in-memory classifier, and the classifier's retries."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from batchd.backends.base import Backend, UpstreamResponse, UpstreamUnavailable
from batchd.backends.moderation import LocalModerationBackend, moderation_inputs
from batchd.contentfilter.embedded import HEADS_FILE, EmbeddedClassifier, Heads, assessment, chunks
from batchd.contentfilter.moderation import OPENAI_CATEGORIES, moderation_result
from batchd.contentfilter.remote import ClassifierFailed, from_guard, from_moderation
from batchd.contentfilter.severity import (
    CATEGORIES,
    NOT_FILTERED,
    Assessment,
    Thresholds,
    blocked_prompt_body,
    prompt_results,
    results,
)
from batchd.contentfilter.texts import choice_texts, prompt_texts
from batchd.engine.content_filter import ContentFilter, Result, retrying_send
from batchd.localmodel.packages import MINILM
from batchd.localmodel.requests import BadRequest
from batchd.models import Usage
from batchd.results.answer import answer_record
from batchd.results.openai import openai_line
from batchd.results.record import decode
from batchd.testing.fake_moderation import guard_verdict, moderation_answer
from tests.unit.localmodel_support import weights_dir

SAFE = {c: {"filtered": False, "severity": "safe"} for c in CATEGORIES}
VIOLENT = Assessment((0, 0, 0, 3), (0.0, 0.0, 0.0, 0.97))
MILD = Assessment((1, 0, 0, 1), (0.2, 0.0, 0.0, 0.3))


# -- shapes -------------------------------------------------------------------------------------
def test_results_in_azure_shape() -> None:
    t = Thresholds.from_names({"hate": "low"})
    assert t.levels == (1, 2, 2, 2)
    assert results(Assessment.safe(), t) == SAFE
    assert results(MILD, t) == {
        **SAFE,
        "hate": {"filtered": True, "severity": "low"},  # threshold low
        "violence": {"filtered": False, "severity": "low"},  # threshold medium
    }
    assert results(None, t) == {
        "error": {"code": "content_filter_error", "message": "The contents are not filtered"}
    }
    assert prompt_results([VIOLENT, None], t) == [
        {"prompt_index": 0, "content_filter_results": results(VIOLENT, t)},
        {"prompt_index": 1, "content_filter_results": NOT_FILTERED},
    ]
    assert t.filtered(MILD) and not Thresholds().filtered(MILD)
    with pytest.raises(ValueError):
        Thresholds.from_names({"violence": "extreme"})


def test_blocked_prompt_body_is_azures_400() -> None:
    body = blocked_prompt_body(VIOLENT, Thresholds())
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code", "status", "innererror"}
    assert (error["code"], error["param"], error["status"]) == ("content_filter", "prompt", 400)
    assert error["innererror"] == {
        "code": "ResponsibleAIPolicyViolation",
        "content_filter_result": {**SAFE, "violence": {"filtered": True, "severity": "high"}},
    }


def test_worst_of_parts() -> None:
    assert Assessment.worst([MILD, VIOLENT]) == Assessment((1, 0, 0, 3), (0.2, 0.0, 0.0, 0.97))
    assert Assessment.worst([]) == Assessment.safe()


# -- the embedded heads: severity mapping and calibration ----------------------------------------
def test_severity_from_cumulative_probabilities() -> None:
    # per category P(>= low), P(>= medium), P(>= high)
    p = np.array(
        [
            [0.10, 0.05, 0.01],  # safe
            [0.70, 0.40, 0.10],  # low
            [0.90, 0.60, 0.45],  # medium
            [0.90, 0.40, 0.80],  # not monotone: made so (high <= medium), so low
        ],
        dtype=np.float32,
    )
    heads = Heads(np.zeros((384, 12), np.float32), np.log(p / (1 - p)).reshape(12))
    probs = heads.probabilities(np.zeros((1, 384), np.float32))[0]
    assert np.all(np.diff(probs, axis=1) <= 0)  # monotone
    found = assessment(probs)
    assert found.severities == (0, 1, 2, 1)
    assert found.scores == pytest.approx((0.05, 0.40, 0.60, 0.40), abs=1e-6)  # P(>= medium)


def test_heads_file_is_small_and_names_the_categories() -> None:
    assert HEADS_FILE.stat().st_size < 100_000
    heads = Heads.load()
    assert heads.weights.shape == (384, 12) and heads.weights.dtype == np.float32
    with np.load(HEADS_FILE) as data:
        assert str(data["embedding"]) == "all-minilm-l6-v2"


def test_chunks_keep_sentences_whole() -> None:
    text = "First sentence here. Second one! " + "word " * 100 + "\n\nLast."
    parts = chunks(text, limit=60)
    assert parts[0] == "First sentence here. Second one!"
    assert all(len(p) <= 60 for p in parts) and parts[-1] == "word " * 3 + "word Last."
    assert " ".join(parts).split() == text.split()  # nothing lost
    assert chunks("   \n ") == []
    assert chunks("x" * 130, limit=60) == ["x" * 60, "x" * 60, "x" * 10]


def _dataset() -> Any:
    path = Path(__file__).parents[2] / "scripts" / "content_filter" / "dataset.py"
    spec = importlib.util.spec_from_file_location("cf_dataset", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cf_dataset"] = module
    spec.loader.exec_module(module)
    return module


def test_calibration_on_the_held_out_split() -> None:
    """The mean P(severity >= medium) of each category matches the held-out rate within 0.05,
    and the severities found agree with the labels on most texts (the figures per category
    are measured by scripts/content_filter/evaluate.py and written in docs/content-filter.md)."""
    weights_dir(MINILM)
    dataset = _dataset()
    _, test = dataset.split(dataset.load())
    from tests.unit.localmodel_support import minilm

    model = minilm()
    probs = Heads.load().probabilities(model.embed(model.tokenize([e.text for e in test])))
    for ci in range(4):
        labels = np.array([e.severities[ci] >= 2 for e in test], dtype=float)
        assert abs(float(probs[:, ci, 1].mean()) - float(labels.mean())) < 0.05
    found = np.array([assessment(p).severities for p in probs])
    true = np.array([e.severities for e in test])
    assert ((found >= 2) == (true >= 2)).mean() > 0.95  # per text and category


async def test_embedded_classifier_judges_clear_cases() -> None:
    weights_dir(MINILM)
    classifier = EmbeddedClassifier()
    try:
        found = await classifier.classify(
            ["What is the capital of France?", "I will shoot you and your family tonight.", ""]
        )
    finally:
        await classifier.close()
    assert found[0].severities == (0, 0, 0, 0) and max(found[0].scores) < 0.1
    assert found[1].severities[3] >= 2 and found[1].scores[3] > 0.5
    assert found[2] == Assessment.safe()  # no text, nothing to judge


# -- mappings of a deployment's answers ---------------------------------------------------------
def test_moderation_answer_to_the_four_categories() -> None:
    scores = {c: 0.001 for c in OPENAI_CATEGORIES}
    flags = {c: False for c in OPENAI_CATEGORIES}
    found = from_moderation({"categories": flags, "category_scores": scores})
    assert found == Assessment((0, 0, 0, 0), (0.001, 0.001, 0.001, 0.001))
    found = from_moderation(
        {
            "categories": {**flags, "harassment/threatening": True},
            "category_scores": {**scores, "harassment/threatening": 0.3, "sexual": 0.95,
                                "self-harm/intent": 0.2, "illicit": 0.99},
        }
    )
    # harassment/threatening: hate and violence, flagged so at least medium; illicit: none
    assert found.severities == (2, 1, 3, 2)
    assert found.scores == (0.3, 0.2, 0.95, 0.3)
    with pytest.raises(ClassifierFailed):
        from_moderation({"flagged": True})


@pytest.mark.parametrize(
    ("answer", "severities"),
    [
        ("safe", (0, 0, 0, 0)),
        ("unsafe\nS1,S10", (3, 0, 0, 3)),
        (" unsafe\nS11\n", (0, 3, 0, 0)),
        ("unsafe\nS3, S12", (0, 0, 3, 0)),
        ("unsafe\nS2,S7", (0, 0, 0, 0)),  # not one of Azure's four
        ("unsafe\nS9", (0, 0, 0, 3)),
    ],
)
def test_guard_answer_to_the_four_categories(answer: str, severities: tuple[int, ...]) -> None:
    found = from_guard(answer)
    assert found.severities == severities
    assert found.scores == tuple(1.0 if s else 0.0 for s in severities)


@pytest.mark.parametrize("answer", ["", "I cannot help with that", "unsafe\nviolence"])
def test_guard_answer_in_another_form_fails(answer: str) -> None:
    with pytest.raises(ClassifierFailed):
        from_guard(answer)


def test_fake_classifiers_agree_with_the_mappings() -> None:
    answer = moderation_answer("m", ["we will attack", "you idiot", "hello"])
    found = [from_moderation(r) for r in answer["results"]]
    assert [a.severities for a in found] == [(0, 0, 0, 3), (3, 0, 0, 0), (0, 0, 0, 0)]
    assert guard_verdict("we will attack, you vermin") == "unsafe\nS1,S10"
    assert from_guard(guard_verdict("hello")) == Assessment.safe()


def test_moderation_result_in_openais_shape() -> None:
    result = moderation_result(Assessment((0, 3, 1, 2), (0.01, 0.9, 0.3, 0.6)))
    assert set(result["categories"]) == set(OPENAI_CATEGORIES)
    assert result["flagged"] is True
    flagged = {c for c, v in result["categories"].items() if v}
    assert flagged == {"self-harm", "violence"}
    assert result["category_scores"]["sexual"] == 0.3
    assert result["category_applied_input_types"]["illicit"] == []
    assert result["category_applied_input_types"]["hate"] == ["text"]
    assert not moderation_result(Assessment.safe())["flagged"]


@pytest.mark.parametrize(
    ("value", "texts"),
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], ["a\nb"]),
    ],
)
def test_moderation_inputs(value: Any, texts: list[str]) -> None:
    assert moderation_inputs(value) == texts


@pytest.mark.parametrize(
    ("value", "param"),
    [(None, "input"), ([], "input"), ([1], "input[0]"),
     ([{"type": "image_url", "image_url": {"url": "u"}}], "input[0]")],
)
def test_moderation_inputs_refused(value: Any, param: str) -> None:
    with pytest.raises(BadRequest) as info:
        moderation_inputs(value)
    assert info.value.param == param


async def test_local_moderation_backend_refuses_other_endpoints() -> None:
    backend = LocalModerationBackend("minilm-moderation")
    resp = await backend.send("/v1/chat/completions", b"{}", time_limit=5)
    assert resp.status_code == 400
    assert orjson.loads(resp.body)["error"]["code"] == "model_not_supported"
    resp = await backend.send("/v1/moderations", b'{"input": 5}', time_limit=5)
    assert orjson.loads(resp.body)["error"]["param"] == "input"
    await backend.close()


# -- the texts judged ---------------------------------------------------------------------------
def test_prompt_and_choice_texts() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                         {"type": "image_url", "image_url": {"url": "x"}}]},
        ]
    }
    assert prompt_texts("/v1/chat/completions", chat) == ["Be brief.\nHi"]
    assert prompt_texts("/v1/completions", {"prompt": ["a", "b"]}) == ["a", "b"]
    assert prompt_texts("/v1/completions", {"prompt": [1, 2, 3]}) == [None]
    responses = {"instructions": "Rules.", "input": [{"role": "user", "content": "Q"}]}
    assert prompt_texts("/v1/responses", responses) == ["Rules.\nQ"]
    assert prompt_texts("/v1/embeddings", {"input": "x"}) == []
    answer = {"choices": [{"message": {"content": "A"}}, {"message": {"content": None}}]}
    assert choice_texts("/v1/chat/completions", answer) == ["A", ""]
    assert choice_texts("/v1/completions", {"choices": [{"text": "t"}]}) == ["t"]
    output = {"output": [{"type": "reasoning"}, {"type": "message", "content": [
        {"type": "output_text", "text": "out"}]}]}
    assert choice_texts("/v1/responses", output) == ["out"]
    messages = {"system": [{"type": "text", "text": "Rules."}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Q"},
                                                          {"type": "image", "source": {}}]}]}
    assert prompt_texts("/v1/messages", messages) == ["Rules.\nQ"]
    assert prompt_texts("/v1/messages", {"messages": [{"content": "Q"}]}) == ["Q"]
    message = {"content": [{"type": "text", "text": "a"}, {"type": "tool_use", "input": {}},
                           {"type": "text", "text": "b"}]}
    assert choice_texts("/v1/messages", message) == ["a\nb"]


# -- the engine hook ----------------------------------------------------------------------------
class WordClassifier:
    """Violent (high) when a text contains "attack"; fails on "boom"."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []

    async def classify(
        self, texts: Sequence[str], *, replying_to: str | None = None
    ) -> list[Assessment]:
        self.calls.append((list(texts), replying_to))
        if any("boom" in t for t in texts):
            raise ClassifierFailed("down")
        return [VIOLENT if "attack" in t else Assessment.safe() for t in texts]

    async def close(self) -> None:
        pass


def _answered(content: str, endpoint: str = "/v1/chat/completions") -> Any:
    if endpoint == "/v1/responses":
        body: dict[str, Any] = {"object": "response", "status": "completed", "output": [
            {"type": "message", "content": [{"type": "output_text", "text": content}]}]}
    else:
        body = {"choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"x": 1},
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    sent: list[int] = []

    async def run() -> Result:
        sent.append(1)
        return answer_record(b'"c1"', UpstreamResponse(200, orjson.dumps(body), "req_1"), 0.0)

    return run, sent


def _line(record: bytes) -> Any:
    """A result record as the OpenAI line it is rendered to."""
    return orjson.loads(openai_line("batch_t", 0, decode(record)))


def _chat_body(text: str) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})


async def test_hook_annotates_without_waiting_for_the_prompt() -> None:
    cf = ContentFilter(WordClassifier(), Thresholds(), block=False, timeout=5)
    run, sent = _answered("we attack at dawn")
    result = await cf.execute(
        run, "/v1/chat/completions", b'"c1"', _chat_body("plan an attack"), 0.0
    )
    assert isinstance(result, tuple) and result[0] and sent == [1]
    assert result[2] == Usage(input_tokens=3, output_tokens=2)
    body = _line(result[1])["response"]["body"]
    flagged = {**SAFE, "violence": {"filtered": True, "severity": "high"}}
    assert body["prompt_filter_results"] == [{"prompt_index": 0, "content_filter_results": flagged}]
    assert body["choices"][0]["content_filter_results"] == flagged
    assert body["choices"][0]["message"]["content"] == "we attack at dawn"


async def test_hook_blocks_a_prompt_and_withholds_an_answer() -> None:
    classifier = WordClassifier()
    cf = ContentFilter(classifier, Thresholds(), block=True, timeout=5)
    run, sent = _answered("hello")
    result = await cf.execute(run, "/v1/chat/completions", b'"c1"', _chat_body("attack now"), 0.0)
    assert sent == [] and isinstance(result, tuple) and not result[0]
    line = _line(result[1])
    assert line["custom_id"] == "c1" and line["response"]["status_code"] == 400
    assert line["response"]["body"]["error"]["code"] == "content_filter"

    run, sent = _answered("attack!")
    result = await cf.execute(run, "/v1/chat/completions", b'"c1"', _chat_body("say hi"), 0.0)
    assert sent == [1] and isinstance(result, tuple) and result[0]
    choice = _line(result[1])["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["logprobs"] is None
    assert choice["message"] == {"role": "assistant", "content": None}
    assert classifier.calls[-1] == (["attack!"], "say hi")  # the answer, with its prompt

    run, _ = _answered("attack!", "/v1/responses")
    body = orjson.dumps({"model": "m", "input": "say hi"})
    result = await cf.execute(run, "/v1/responses", b'"c1"', body, 0.0)
    assert isinstance(result, tuple)
    response = _line(result[1])["response"]["body"]
    assert response["status"] == "incomplete" and response["output"] == []
    assert response["incomplete_details"] == {"reason": "content_filter"}
    assert "prompt_filter_results" not in response


async def test_block_mode_filters_messages_passed_through() -> None:
    """A /v1/messages request (an api_style = "anthropic" upstream) is judged in block mode:
    a flagged prompt is not sent, a flagged answer is withheld as Anthropic's refusals are;
    annotate mode leaves the Message as received (it has no place for annotations)."""
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "c",
               "content": [{"type": "text", "text": "attack!"}], "stop_reason": "end_turn",
               "stop_sequence": None, "usage": {"input_tokens": 2, "output_tokens": 1}}
    sent: list[int] = []

    async def run() -> Result:
        sent.append(1)
        return answer_record(
            b'"c1"', UpstreamResponse(200, orjson.dumps(message), "req_1"), 0.0
        )

    def ask(text: str) -> bytes:
        return orjson.dumps({"model": "c", "max_tokens": 5, "system": "S",
                             "messages": [{"role": "user", "content": text}]})

    classifier = WordClassifier()
    block = ContentFilter(classifier, Thresholds(), block=True, timeout=5)
    result = await block.execute(run, "/v1/messages", b'"c1"', ask("attack now"), 0.0)
    assert sent == [] and isinstance(result, tuple) and not result[0]
    assert _line(result[1])["response"]["status_code"] == 400

    result = await block.execute(run, "/v1/messages", b'"c1"', ask("say hi"), 0.0)
    assert sent == [1] and isinstance(result, tuple) and result[0]
    withheld = _line(result[1])["response"]["body"]
    assert withheld == {**message, "content": [], "stop_reason": "refusal"}
    assert classifier.calls[-1] == (["attack!"], "S\nsay hi")

    annotate = ContentFilter(WordClassifier(), Thresholds(), block=False, timeout=5)
    result = await annotate.execute(run, "/v1/messages", b'"c1"', ask("attack now"), 0.0)
    assert isinstance(result, tuple) and result[0]
    assert _line(result[1])["response"]["body"] == message


async def test_hook_serves_unfiltered_when_the_classifier_fails() -> None:
    """annotate: as Azure, the line is served and says it was not filtered."""
    cf = ContentFilter(WordClassifier(), Thresholds(), block=False, timeout=5)
    run, sent = _answered("boom")
    result = await cf.execute(run, "/v1/chat/completions", b'"c1"', _chat_body("boom attack"), 0.0)
    assert sent == [1] and isinstance(result, tuple) and result[0]
    body = _line(result[1])["response"]["body"]
    assert body["prompt_filter_results"][0]["content_filter_results"] == NOT_FILTERED
    assert body["choices"][0]["content_filter_results"] == NOT_FILTERED
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_block_fails_closed_when_the_classifier_fails() -> None:
    """block: a prompt nobody could judge is not sent (a slow-to-judge prompt never passes)."""
    cf = ContentFilter(WordClassifier(), Thresholds(), block=True, timeout=5)
    run, sent = _answered("fine")
    result = await cf.execute(run, "/v1/chat/completions", b'"c1"', _chat_body("boom attack"), 0.0)
    assert sent == [] and isinstance(result, tuple) and not result[0]
    line = _line(result[1])
    assert line["response"]["status_code"] == 503
    assert line["response"]["body"]["error"]["code"] == "content_filter_error"


async def test_hook_passes_other_endpoints_and_error_lines_through() -> None:
    classifier = WordClassifier()
    cf = ContentFilter(classifier, Thresholds(), block=True, timeout=5)
    run, sent = _answered("attack")
    result = await cf.execute(run, "/v1/embeddings", b'"c1"', b'{"input": "attack"}', 0.0)
    assert sent == [1] and classifier.calls == []
    assert isinstance(result, tuple)
    assert "prompt_filter_results" not in _line(result[1])["response"]["body"]

    async def failing() -> Result:
        return answer_record(b'"c1"', UpstreamResponse(500, b'{"error": {}}', "r"), 0.0)

    result = await cf.execute(failing, "/v1/chat/completions", b'"c1"', _chat_body("hi"), 0.0)
    assert isinstance(result, tuple) and not result[0]
    assert _line(result[1])["response"]["body"] == {"error": {}}


# -- the classifier deployment's retries --------------------------------------------------------
class Flaky(Backend):
    def __init__(self, answers: list[UpstreamResponse | Exception]) -> None:
        self.answers = answers
        self.calls = 0

    async def send(self, endpoint: str, body: bytes, *, time_limit: float) -> UpstreamResponse:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_classifier_calls_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_sleep(_: float) -> None:
        return None

    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    ok = UpstreamResponse(200, b"{}", "r")
    backend = Flaky([UpstreamResponse(503, b"", "r"), UpstreamResponse(429, b"", "r", 1.0), ok])
    assert await retrying_send(backend, 5)("/v1/moderations", b"{}") is ok
    backend = Flaky([UpstreamResponse(400, b"", "r")])
    assert (await retrying_send(backend, 5)("/v1/moderations", b"{}")).status_code == 400
    assert backend.calls == 1  # a 400 is final
    backend = Flaky([UpstreamUnavailable("refused")] * 3)
    with pytest.raises(ClassifierFailed):
        await retrying_send(backend, 5)("/v1/moderations", b"{}")
    assert backend.calls == 3


async def test_embedded_classifier_remembers_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk judged once (a system prompt every line repeats) is not embedded again; the
    memory is bounded."""
    classifier = EmbeddedClassifier()
    judged: list[list[str]] = []

    async def judge(texts: list[str], time_limit: float) -> list[Assessment]:
        judged.append(texts)
        return [VIOLENT if "attack" in t else Assessment.safe() for t in texts]

    monkeypatch.setattr(classifier, "_judge", judge)
    monkeypatch.setattr("batchd.contentfilter.embedded.CACHE_CHUNKS", 3)
    long_rule = "Answer politely. " * 20  # more than one chunk
    first = await classifier.classify([long_rule + "\nWe attack.", long_rule + "\nHello."])
    assert [a.severities for a in first] == [(0, 0, 0, 3), (0, 0, 0, 0)]
    assert await classifier.classify([long_rule + "\nWe attack."]) == first[:1]
    assert len(judged) == 1 and len(judged[0]) == len(set(judged[0]))  # each chunk once
    assert len(classifier._cache) == 3
