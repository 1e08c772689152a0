"""Judges of the rubric reward: the API judge against a local HTTP server, the model judge
on the tiny random model, and a rubric training run that logs the judge's work."""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from jaxpost.runtime.credentials import Secret, SecretSources
from jaxpost.rewards.judges import (APIJudge, JudgeSettings, ModelJudge, build_judge,
                                    resolve_judge_key)
from jaxpost.rewards.rubrics import Criterion, CriterionQuery, RubricJudgeError, RubricQuery, rubric, \
    rubric_to_json

KEY = "sk-test-7c1e9b55d0f2a4"


class _Server:
    """A chat-completions server on 127.0.0.1 whose replies a test scripts.

    ``reply(request_number, body) -> (status, content or None, delay_s)``; content None
    sends a body that is not a chat completion.
    """

    def __init__(self, reply):
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body,
                                       "auth": self.headers.get("Authorization")})
                status, content, delay = reply(len(outer.requests), body)
                time.sleep(delay)
                payload = (b"<html>oops</html>" if content is None else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}
                ).encode())
                try:
                    # The reason phrase echoes the key: the judge must not pass it on.
                    self.send_response(status, None if status == 200 else f"bad {KEY}")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _yes_if_scattering(n, body):
    text = body["messages"][0]["content"]
    criterion = text.split("Criterion:")[1]
    return 200, ("Yes." if "scatter" in criterion else "no"), 0.0


def _judge(url, **kw):
    kw = {"timeout": 2.0, "retries": 2, "concurrency": 3, "backoff": 0.01, **kw}
    return APIJudge(url, "judge-model", Secret(KEY), **kw)


Q = [CriterionQuery("Why is the sky blue?", "Air scatters blue light.", "Mentions scattering"),
     CriterionQuery("Why is the sky blue?", "Air scatters blue light.", "Mentions the ocean")]


def test_api_judge_success_sends_key_only_in_the_header():
    with _Server(_yes_if_scattering) as server:
        judge = _judge(server.url)
        assert judge.score_criteria(Q) == [1.0, 0.0]
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    assert all(r["body"]["model"] == "judge-model" for r in server.requests)
    assert all(KEY not in json.dumps(r["body"]) for r in server.requests)
    assert KEY not in repr(judge)
    assert judge.stats.snapshot()["calls"] == 2


def test_api_judge_retries_after_a_timeout():
    # The first request answers after the client's timeout; the retry is answered at once.
    with _Server(lambda n, body: (200, "Yes", 1.0 if n == 1 else 0.0)) as server:
        judge = _judge(server.url, timeout=0.3)
        assert judge.score_criteria(Q[:1]) == [1.0]
    assert len(server.requests) == 2
    stats = judge.stats.snapshot()
    assert stats["calls"] == 2 and stats["failures"] == 0


def test_api_judge_malformed_replies_are_unscored_not_zero(caplog):
    replies = {1: (200, "Perhaps, partly.", 0.0), 2: (200, None, 0.0)}
    with _Server(lambda n, body: replies.get(n, (200, "Yes", 0.0))) as server:
        judge = _judge(server.url, concurrency=1)
        with caplog.at_level(logging.WARNING, logger="jaxpost.rewards.judges"):
            scores = judge.score_criteria(Q + [CriterionQuery("q", "a", "third")])
    assert scores == [None, None, 1.0]
    assert judge.stats.snapshot()["failures"] == 2
    assert "neither Yes nor No" in caplog.text and "malformed response" in caplog.text
    # In the reward, the unscored criteria are left out: only "third" counts.
    crit = (Criterion("Mentions scattering"), Criterion("Mentions the ocean"), Criterion("x"))
    table = {"x": 1.0}

    class Partial:
        def score_criteria(self, queries):
            return [table.get(q.criterion) for q in queries]

    cols = {"question": ["q"], "rubric": [rubric_to_json(crit)]}
    assert rubric(["p"], ["a"], judge=Partial(), **cols) == [1.0]


def test_api_judge_cache_and_implicit_rating():
    with _Server(lambda n, body: (200, "7", 0.0)) as server:
        judge = _judge(server.url)
        query = RubricQuery("q", "a", (Criterion("c"),))
        assert judge.rate_rubrics([query]) == [7.0]
        assert judge.rate_rubrics([query, query]) == [7.0, 7.0]
    assert len(server.requests) == 1
    assert judge.stats.snapshot()["cache_hits"] == 2


def test_api_key_never_in_logs_or_errors(caplog):
    with _Server(lambda n, body: (500, "x", 0.0)) as server:
        judge = _judge(server.url, retries=1)
        cols = {"question": ["q"], "rubric": [rubric_to_json((Criterion("c"),))]}
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(RubricJudgeError) as err:
                rubric(["p"], ["a"], judge=judge, **cols)
    assert len(server.requests) == 2  # a 5xx is retried
    assert "HTTP 500" in caplog.text and "***" in caplog.text
    assert KEY not in caplog.text and KEY not in str(err.value) and KEY not in repr(judge)
    with _Server(lambda n, body: (401, "x", 0.0)) as server:
        judge = _judge(server.url, retries=3)
        with caplog.at_level(logging.DEBUG):
            assert judge.score_criteria(Q[:1]) == [None]
    assert len(server.requests) == 1  # a 4xx other than 429 is not retried
    assert KEY not in caplog.text


def test_judge_key_comes_from_the_secret_stores():
    env = SecretSources(environ={"MY_JUDGE_KEY": KEY})
    assert resolve_judge_key("MY_JUDGE_KEY", sources=env) == Secret(KEY)
    assert resolve_judge_key("OTHER", sources=env) is None
    assert str(resolve_judge_key("MY_JUDGE_KEY", sources=env)) == "***"


# ---------------------------------------------------------------------------
# Model judge


@pytest.fixture(scope="module")
def tiny():
    from jaxpost.models.loading import load_model

    return load_model("random:gemma3-tiny", show_progress=False)


def test_model_judge_graded_scores_in_batches(tiny):
    judge = ModelJudge(tiny, "gemma", batch_size=2)
    queries = [CriterionQuery("Why is the sky blue?", f"Answer number {i}.", f"Criterion {i}")
               for i in range(5)]
    scores = judge.score_criteria(queries)
    assert len(scores) == 5 and all(0.0 < s < 1.0 for s in scores)
    assert len(set(scores)) > 1  # graded: depends on the text
    # Left padding and batch position do not change a row's score.
    alone = judge.score_criteria(queries[3:4])
    assert alone[0] == pytest.approx(scores[3], abs=1e-5)
    # 5 rows in batches of 2, one length bucket: a single compiled shape.
    assert judge._forward._cache_size() == 1
    assert judge.stats.snapshot()["calls"] == 6
    [rating] = judge.rate_rubrics([RubricQuery("q", "a", (Criterion("c"),))])
    assert 1.0 <= rating <= 10.0


def test_build_judge_reuses_the_session_model(tiny):
    from jaxpost.config import get_preset

    config = get_preset("rubric_smoke")
    judge = build_judge(JudgeSettings.from_config(config), tiny)
    assert isinstance(judge, ModelJudge) and judge.loaded is tiny
    lexical = build_judge(JudgeSettings.from_config(dataclasses.replace(config, judge="lexical")))
    assert type(lexical).__name__ == "LexicalJudge"


def test_judge_settings_are_a_config_value():
    """build_judge needs no config; a config's judge fields map onto JudgeSettings, whose
    defaults are the config's."""
    from jaxpost.config import ColabTrainingConfig

    assert type(build_judge(JudgeSettings(kind="lexical"))).__name__ == "LexicalJudge"
    assert JudgeSettings.from_config(ColabTrainingConfig()) == JudgeSettings(kind="model")
    config = ColabTrainingConfig(judge="api", judge_api_base_url="https://judge.example/v1",
                                 judge_api_model="m", judge_api_timeout=5.0, seed=7)
    settings = JudgeSettings.from_config(config)
    assert (settings.kind, settings.api_base_url, settings.api_model, settings.api_timeout,
            settings.seed) == ("api", "https://judge.example/v1", "m", 5.0, 7)
    judge = build_judge(settings)
    assert isinstance(judge, APIJudge) and judge.model == "m" and judge.timeout == 5.0
    with pytest.raises(ValueError, match="judge='oracle'"):
        build_judge(JudgeSettings(kind="oracle"))
    with pytest.raises(ValueError, match="pass loaded="):
        build_judge(JudgeSettings(kind="model"))


def test_rubric_smoke_run_logs_judge_metrics(tmp_path):
    """`jaxpost train --preset rubric_smoke`: two steps with the model judge."""
    r = subprocess.run([sys.executable, "-m", "jaxpost.cli", "train", "--preset", "rubric_smoke",
                        "--set", "output_dir=run", "--set", "tensorboard=false"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows: dict[int, dict] = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.setdefault(rec["step"], {})[rec["name"]] = rec["value"]
    for step in (1, 2):
        assert rows[step]["judge/calls"] > 0 and rows[step]["judge/seconds"] > 0
        assert rows[step]["judge/failures"] == 0
        assert 0.0 <= rows[step]["rewards/rubric"] <= 1.0
