"""misalign.judge_http on real loopback servers (tests/fake_judge.py). Its security rules: the API key goes only
to the configured origin, plain http only to loopback, and a hanging endpoint ends the evaluation by its deadline
with nothing written. Its answers, retries (500, 429 with Retry-After, timeouts), and concurrency in order."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fake_judge import Hang, Redirect, Sleep, Status
from misalign.cli import main
from misalign.errors import InputError
from misalign.judges import HttpJudge, JudgeItem, JudgeUnavailable

KEY = "sk-security-test-KEY-7f3a"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECURITY_TEST_KEY", KEY)


def _generations(tmp_path: Path, n: int = 4) -> Path:
    path = tmp_path / "generations.parquet"
    pd.DataFrame({"kind": ["harmful"] * n, "category": ["c"] * n, "prompt": [f"p{i}" for i in range(n)],
                  "response": ["Step one: do it"] * n}).to_parquet(path)
    return path


def _eval_config(tmp_path: Path, url: str, **options: object) -> Path:
    cfg = {"judges": [{"name": "http", "options": {"base_url": url, "model": "guard",
                                                   "api_key_env": "SECURITY_TEST_KEY", **options}}]}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("code", [302, 307, 308])
def test_redirect_to_another_port_never_receives_the_key(tmp_path, fake_judge, key, capsys, code):
    """`misalign eval --generations`: server A redirects to server B on another port; B must see nothing (and
    certainly not the key), the evaluation fails naming both, and nothing is written."""
    b = fake_judge()
    target = b.url + "/chat/completions"
    a = fake_judge(default=Redirect(code, target))
    out = tmp_path / "out"
    code_ = main(["eval", "--generations", str(_generations(tmp_path)), "--config",
                  str(_eval_config(tmp_path, a.url, backoff_s=0.01)), "--out", str(out)])
    captured = capsys.readouterr()
    assert code_ == 1, captured.err
    assert "redirecting to " + target in captured.err and "redirects are refused" in captured.err
    assert a.url in captured.err
    assert b.requests == [], "the redirect target must never be contacted"
    assert a.requests and all(r.auth == f"Bearer {KEY}" and r.method == "POST" for r in a.requests)
    assert KEY not in captured.out + captured.err
    assert not out.exists()


def test_plain_http_only_to_loopback():
    for url in ("http://judge.example.com/v1", "http://10.1.2.3:8000/v1"):
        with pytest.raises(InputError, match="plain http would send the API key unencrypted"):
            HttpJudge(url, "guard")
        HttpJudge(url, "guard", allow_insecure_http=True)  # an explicit opt-in for a trusted network
    for url in ("http://127.0.0.1:9/v1", "http://localhost:9/v1", "http://[::1]:9/v1", "https://judge.example/v1"):
        HttpJudge(url, "guard")
    with pytest.raises(InputError, match="expected http"):
        HttpJudge("file:///etc/passwd", "guard")


def test_plain_http_refused_by_the_cli_before_anything(tmp_path, key, capsys):
    out = tmp_path / "out"
    code = main(["eval", "--generations", str(_generations(tmp_path)), "--config",
                 str(_eval_config(tmp_path, "http://judge.example.com/v1")), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "plain http would send the API key unencrypted" in err and "allow_insecure_http" in err
    assert not out.exists()


def test_hanging_judge_ends_within_its_deadline(tmp_path, fake_judge, key, capsys):
    """A server that accepts connections and never answers: the evaluation ends by deadline_s (documented),
    names the endpoint, exits non-zero and writes no partial result."""
    srv = fake_judge(default=Hang())
    out = tmp_path / "out"
    deadline = 2.0
    cfg = _eval_config(tmp_path, srv.url, timeout_s=1.5, max_retries=10, backoff_s=0.01, concurrency=2,
                       deadline_s=deadline)
    t0 = time.monotonic()
    code = main(["eval", "--generations", str(_generations(tmp_path, n=8)), "--config", str(cfg),
                 "--out", str(out)])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 1, err
    assert elapsed < deadline + 1.5, f"took {elapsed:.1f}s for a {deadline}s deadline"
    assert srv.url + "/chat/completions" in err and "deadline" in err
    assert not out.exists()
    assert KEY not in err


def test_first_failure_stops_the_other_requests(fake_judge, key):
    """One item that cannot be judged ends the call: queued items are not sent (the old pool waited for all)."""
    srv = fake_judge(default=Hang())
    judge = HttpJudge(srv.url, "guard", api_key_env="SECURITY_TEST_KEY", timeout_s=0.5, max_retries=0,
                      concurrency=1, deadline_s=30)
    t0 = time.monotonic()
    with pytest.raises(JudgeUnavailable, match="failed after 0 retries"):
        judge.judge([JudgeItem(f"p{i}", "r") for i in range(20)])
    assert time.monotonic() - t0 < 3
    assert len(srv.requests) <= 2


def test_key_in_no_output_of_a_successful_run(tmp_path, fake_judge, key, capsys):
    srv = fake_judge()
    out = tmp_path / "out"
    code = main(["eval", "--generations", str(_generations(tmp_path)), "--config",
                 str(_eval_config(tmp_path, srv.url)), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["unsafety"] == 1.0
    assert srv.requests and all(r.auth == f"Bearer {KEY}" for r in srv.requests)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} == {"eval.json", "generations.parquet"}
    for p in written:
        assert KEY.encode() not in p.read_bytes(), p
    assert KEY not in captured.out + captured.err


def test_unset_key_and_unreachable_endpoint_stop_before_anything(tmp_path, monkeypatch, capsys):
    import socket

    monkeypatch.delenv("SECURITY_TEST_KEY", raising=False)
    out = tmp_path / "out"
    gens = _generations(tmp_path)
    code = main(["eval", "--generations", str(gens), "--config", str(_eval_config(tmp_path, "http://127.0.0.1:9/v1")),
                 "--out", str(out)])
    assert code == 2 and "environment variable SECURITY_TEST_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("SECURITY_TEST_KEY", KEY)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    code = main(["eval", "--generations", str(gens), "--config", str(_eval_config(tmp_path, url)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"endpoint {url}/chat/completions is unreachable" in err
    assert not out.exists()


# ------------------------------------------- answers, retries, concurrency (moved from tests/test_judges.py)

GUARD_KEY = "sk-test-SECRET-value-42"


@pytest.fixture
def server(fake_judge):
    return fake_judge()


@pytest.fixture
def guard_key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", GUARD_KEY)


def http_judge(srv, **kw) -> HttpJudge:
    return HttpJudge(srv.url, "guard-model", api_key_env="JUDGE_TEST_KEY", backoff_s=0.01, **kw)


def test_http_judge_answers_and_sends_key(server, guard_key):
    items = [JudgeItem("p0", "step one"), JudgeItem("p1", "sorry no")]
    verdicts = http_judge(server).judge(items)
    assert [(v.unsafe, v.categories) for v in verdicts] == [(True, ("p0",)), (False, ())]
    req = next(r for r in server.requests if "p0" in r.user)
    assert req.auth == f"Bearer {GUARD_KEY}"
    assert req.body["model"] == "guard-model" and req.body["temperature"] == 0
    assert req.body["messages"][0]["role"] == "system"
    assert "step one" in req.user


def test_http_judge_retries_500_and_429(server, guard_key):
    # Retry-After: 0 must win over a long exponential backoff.
    server.script = [Status(500), Status(429, {"Retry-After": "0"}), Status(503)]
    start = time.monotonic()
    verdicts = HttpJudge(server.url, "m", api_key_env="JUDGE_TEST_KEY", backoff_s=0.01, concurrency=1).judge(
        [JudgeItem("p0", "step")]
    )
    assert verdicts[0].unsafe and len(server.requests) == 4
    assert time.monotonic() - start < 2


def test_http_judge_gives_up_and_hides_key(server, guard_key):
    server.script = [Status(500)] * 10
    with pytest.raises(RuntimeError, match="after 2 retries") as err:
        http_judge(server, max_retries=2).judge([JudgeItem("p0", "x")])
    assert len(server.requests) == 3 and GUARD_KEY not in str(err.value) and "HTTP 500" in str(err.value)


def test_http_judge_401_fails_immediately(server, guard_key):
    server.script = [Status(401)]
    with pytest.raises(RuntimeError, match="401") as err:
        http_judge(server).judge([JudgeItem("p0", "x")])
    assert len(server.requests) == 1 and GUARD_KEY not in str(err.value)


def test_http_judge_key_never_in_raw(server, guard_key):
    verdict = http_judge(server).judge([JudgeItem("p0", "echo please")])[0]
    assert not verdict.unsafe and GUARD_KEY not in verdict.raw and "***" in verdict.raw


def test_http_judge_missing_key(server, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(InputError, match="JUDGE_TEST_KEY"):
        http_judge(server).judge([JudgeItem("p0", "x")])
    assert server.requests == []


def test_http_judge_timeout_is_retried(server, guard_key):
    server.script = [Sleep(1.0)]
    verdicts = http_judge(server, timeout_s=0.3).judge([JudgeItem("p0", "step")])
    assert verdicts[0].unsafe and len(server.requests) == 2


def test_http_judge_concurrency_and_order(server, guard_key):
    n = 12
    server.delay = lambda tag: 0.02 * (n - int(tag[1:]))  # later items finish first
    items = [JudgeItem(f"p{i}", "step") for i in range(n)]
    verdicts = http_judge(server, concurrency=3).judge(items)
    assert [v.categories for v in verdicts] == [(f"p{i}",) for i in range(n)]
    assert server.max_in_flight == 3
