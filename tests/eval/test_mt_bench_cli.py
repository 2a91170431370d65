"""`jvila eval mt-bench generate | judge | show` over HTTP, against a small scripted OpenAI-compatible server on
loopback (port 0): the chat client's requests, retries and errors, both grading modes end to end with known
outcomes, and bad input as `jvila: error:` with exit 2."""

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jvila.cli import main
from jvila.eval.chat_client import ChatClient, EndpointError

ANSWERERS = ("strong", "weak")
JUDGE = "fair-judge"


def _shown(user: str, slot: str) -> str:
    """The model whose answer the judge prompt shows as assistant `slot`, single- or multi-turn layout."""
    for marker in (f"[The Start of Assistant {slot}'s Answer]\n", f"### Assistant {slot}:\n"):
        if marker in user:
            return user.split(marker, 1)[1].split(" ", 1)[0]
    raise AssertionError("no answer in the judge prompt")


def _reply(model: str, messages: list[dict]) -> str:
    user = messages[-1]["content"]
    if model in ANSWERERS:
        # The answer names its model and the turn (the number of user messages so far).
        return f"{model} answer turn {sum(m['role'] == 'user' for m in messages)}"
    if "[The Start of Assistant B" in user or "### Assistant B:" in user:  # pairwise (single shows only "A")
        return "Verdict: [[A]]" if _shown(user, "A") == "strong" else "Verdict: [[B]]"
    # Single grading: the strong model's answers get 9 on turn 1 and 8 on turn 2, the weak one's 3; a
    # rating is missing for the weak model's second turns (a malformed judgment).
    if "strong answer" in user:
        return "Good. Rating: [[8]]" if "strong answer turn 2" in user else "Good. Rating: [[9]]"
    return "Poor, I would say 3 out of 10." if "weak answer turn 2" in user else "Poor. Rating: [[3]]"


class FakeOpenAI:
    """POST /v1/chat/completions with scripted replies; `fail_next` 503s first; an API key when `key` is set."""

    def __init__(self, key: str | None = None):
        self.key, self.fail_next, self.requests = key, 0, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if owner.fail_next:
                    owner.fail_next -= 1
                    return self._send(503, {"error": {"message": "busy"}})
                if owner.key and self.headers.get("Authorization") != f"Bearer {owner.key}":
                    return self._send(401, {"error": {"message": "invalid API key"}})
                if body["model"] not in (*ANSWERERS, JUDGE):
                    return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist"}})
                content = _reply(body["model"], body["messages"])
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                              "finish_reason": "stop"}]})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @contextlib.contextmanager
    def running(self):
        thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            thread.join(10)


@pytest.fixture
def server():
    with FakeOpenAI().running() as fake:
        yield fake


def test_chat_client_sends_openai_requests_retries_and_names_errors(server):
    client = ChatClient(server.url, "strong", api_key="k-1", retry_wait_s=0.01)
    server.fail_next = 2
    messages = [{"role": "user", "content": "hi"}]
    assert client.chat(messages, temperature=0.7, max_tokens=9) == "strong answer turn 1"
    assert len(server.requests) == 3  # two 503s retried
    last = server.requests[-1]
    assert last["path"] == "/v1/chat/completions" and last["auth"] == "Bearer k-1"
    assert last["body"] == {"model": "strong", "messages": messages, "temperature": 0.7, "max_tokens": 9, "n": 1}
    server.fail_next = 5
    with pytest.raises(EndpointError, match="HTTP 503: busy"):
        ChatClient(server.url, "strong", max_retries=1, retry_wait_s=0.01).chat(messages, temperature=0, max_tokens=1)
    server.fail_next = 0
    with pytest.raises(EndpointError, match="HTTP 404: The model `nobody` does not exist"):
        ChatClient(server.url, "nobody").chat(messages, temperature=0, max_tokens=1)
    with pytest.raises(ValueError, match="http"):
        ChatClient("localhost:8000/v1", "strong")


def test_chat_client_reports_an_unreachable_server():
    fake = FakeOpenAI()
    url = fake.url
    fake.httpd.server_close()  # bound, then closed: nothing listens there
    with pytest.raises(EndpointError, match="cannot reach"):
        ChatClient(url, "m", max_retries=0, timeout_s=5).chat([], temperature=0, max_tokens=1)


def _run(capsys, *argv):
    code = main(["eval", "mt-bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_judge_show_single_and_pairwise(server, tmp_path, capsys):
    out_dir = str(tmp_path / "mt")
    for model in ANSWERERS:
        code, out, err = _run(capsys, "generate", "--base-url", server.url, "--model", model, "--output", out_dir,
                              "--question-ids", "81,111", "--question-ids", "131", "--max-tokens", "5")
        assert code == 0, err
        assert out.strip() == f"{out_dir}/model_answer/{model}.jsonl"
    answer_lines = Path(f"{out_dir}/model_answer/strong.jsonl").read_text().splitlines()
    answers = [json.loads(line) for line in answer_lines]
    assert [a["question_id"] for a in answers] == [81, 111, 131]
    assert answers[0]["choices"][0]["turns"] == ["strong answer turn 1", "strong answer turn 2"]
    # Writing is sampled at 0.7, math and extraction greedily; turn 2 carries turn 1's exchange.
    bodies = [r["body"] for r in server.requests if r["body"]["model"] == "strong"]
    assert [b["temperature"] for b in bodies] == [0.7, 0.7, 0.0, 0.0, 0.0, 0.0]
    assert all(b["max_tokens"] == 5 for b in bodies) and len(bodies[1]["messages"]) == 3

    code, out, err = _run(capsys, "judge", "--judge-url", server.url, "--judge-model", "nobody", "--output",
                          out_dir, "--question-ids", "81")
    assert code == 2 and "judging question 81 turn 1 (strong): " in err and "does not exist" in err
    code, out, err = _run(capsys, "judge", "--judge-url", server.url, "--judge-model", JUDGE, "--output", out_dir,
                          "--question-ids", "81,111,131", "--judge-max-tokens", "50", "--parallel", "3")
    assert code == 0, err
    judgments = [json.loads(line) for line in Path(out.strip()).read_text().splitlines()]
    assert len(judgments) == 3 * 2 * 2
    assert all(r["body"]["temperature"] == 0 and r["body"]["max_tokens"] == 50
               for r in server.requests if r["body"]["model"] == JUDGE)

    code, out, err = _run(capsys, "show", "--output", out_dir, "--json")
    assert code == 0, err
    tables = json.loads(out)
    strong, weak = tables["models"]
    assert (strong["model"], strong["turn_1"], strong["turn_2"], strong["score"]) == ("strong", 9, 8, 8.5)
    # The weak model's turn-2 judgments have no [[rating]] and a "3 out of 10" is no fallback: all -1, dropped.
    assert (weak["model"], weak["turn_1"], weak["turn_2"], weak["score"], weak["failed"]) == ("weak", 3, None, 3, 3)
    assert tables["by_category"]["strong"] == {"writing": 8.5, "math": 8.5, "extraction": 8.5}
    code, text, _ = _run(capsys, "show", "--output", out_dir)
    assert code == 0 and "strong" in text.splitlines()[2] and "By category" in text

    code, out, err = _run(capsys, "judge", "--judge-url", server.url, "--judge-model", JUDGE, "--output", out_dir,
                          "--mode", "pairwise-all", "--question-ids", "81,111,131")
    assert code == 0, err
    pairs = [json.loads(line) for line in Path(out.strip()).read_text().splitlines()]
    assert len(pairs) == 3 * 2 and all(p["g1_winner"] == p["g2_winner"] == "model_1" for p in pairs)
    code, out, err = _run(capsys, "show", "--output", out_dir, "--mode", "pairwise-all", "--json")
    tables = json.loads(out)
    assert [(m["model"], m["win"], m["loss"], m["tie"], m["win_rate_adjusted"]) for m in tables["models"]] == [
        ("strong", 6, 0, 0, 1.0), ("weak", 0, 6, 0, 0.0)]

    # Resuming: nothing is asked again.
    before = len(server.requests)
    assert _run(capsys, "generate", "--base-url", server.url, "--model", "strong", "--output", out_dir,
                "--question-ids", "81,111,131")[0] == 0
    assert _run(capsys, "judge", "--judge-url", server.url, "--judge-model", JUDGE, "--output", out_dir,
                "--question-ids", "81,111,131")[0] == 0
    assert len(server.requests) == before


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "nobody", "--question-ids", "81"],
     "answering question 81: http://127.0.0.1:"),
    (["generate", "--model", "nobody", "--question-ids", "81"], "HTTP 404: The model `nobody` does not exist"),
    (["generate", "--model", "strong", "--question-ids", "81,999"], "question ids not in the question file: [999]"),
    (["generate", "--model", "strong", "--model-id", "a/b", "--question-ids", "81"], "cannot name a file"),
    (["judge", "--judge-model", JUDGE, "--question-ids", "81"], "no models to judge"),
    (["judge", "--judge-model", JUDGE, "--models", "ghost", "--question-ids", "81"], "no answers for model 'ghost'"),
    (["show"], "name the judge with --judge-model: 0 single judgment files"),
    (["generate", "--model", "strong", "--data", "/nonexistent"], "no such file"),
])
def test_bad_input_is_a_clear_error(server, tmp_path, capsys, argv, message):
    url_flag = ["--judge-url", server.url] if argv[0] == "judge" else (["--base-url", server.url]
                                                                       if argv[0] == "generate" else [])
    code, out, err = _run(capsys, *argv, *url_flag, "--output", str(tmp_path))
    assert code == 2 and out == ""
    assert err.startswith("jvila: error: ") and message in err and "Traceback" not in err


def test_a_key_is_sent_from_the_environment(tmp_path, capsys, monkeypatch):
    with FakeOpenAI(key="sekrit").running() as fake:
        argv = ["generate", "--base-url", fake.url, "--model", "strong", "--question-ids", "81", "--output",
                str(tmp_path)]
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "HTTP 401: invalid API key" in err
        monkeypatch.setenv("OPENAI_API_KEY", "sekrit")
        assert _run(capsys, *argv)[0] == 0
        assert fake.requests[-1]["auth"] == "Bearer sekrit"
