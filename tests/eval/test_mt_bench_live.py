"""MT-bench end to end on our own server: SmolLM2-135M-Instruct (real weights) answers a math question over two
turns and then judges its own answers against GPT-4's reference, all through `jvila eval mt-bench`; the tables
come out of the judgments it wrote.

Kept to one question, few tokens and one step shape (one compilation): the engine runs one request at a time
with an 8-token step and a single 1024-token page per sequence.
"""

import json
from pathlib import Path

import pytest

from jvila.cli import main
from jvila.eval.chat_client import ChatClient
from jvila.eval.mt_bench.data import (
    load_questions,
    load_reference_answers,
    packaged_data_dir,
    select_questions,
)
from jvila.eval.mt_bench.verdicts import parse_rating
from serving.api_server import ServerThread
from serving.launch import EngineOptions, build_app

SERVED = "smollm2"
QUESTION = 111  # math: greedy answers, and judged with the reference-guided prompts


@pytest.fixture(scope="module")
def server_url():
    # Built outside the test's output capture: the model load and the server thread outlive capsys.
    options = EngineOptions(num_pages=2, page_size=1024, max_running=1, token_budget=8, max_context=1024)
    app, _ = build_app("smollm2-135m-instruct", served_name=SERVED, scheduler="fcfs", options=options)
    server = ServerThread(app).start()
    try:
        yield server.url + "/v1"
    finally:
        server.stop()


def test_smollm2_answers_and_judges_itself_through_our_server(server_url, tmp_path, capsys):
    url = server_url
    out_dir = tmp_path / "mt"
    common = ["--output", str(out_dir), "--question-ids", str(QUESTION)]
    assert main(["eval", "mt-bench", "generate", "--base-url", url, "--model", SERVED, "--max-tokens", "8",
                 *common]) == 0
    answer_file = capsys.readouterr().out.strip()
    (record,) = [json.loads(line) for line in Path(answer_file).read_text().splitlines()]
    first, second = record["choices"][0]["turns"]
    assert record["question_id"] == QUESTION and record["model_id"] == SERVED and first and second
    # Greedy (math is answered at temperature 0): turn 2 is what the model says after the whole first exchange.
    (question,) = select_questions(load_questions(packaged_data_dir() / "question.jsonl"), question_ids=[QUESTION])
    again = ChatClient(url, SERVED).chat(
        [{"role": "user", "content": question.turns[0]}, {"role": "assistant", "content": first},
         {"role": "user", "content": question.turns[1]}], temperature=0, max_tokens=8)
    assert again == second

    assert main(["eval", "mt-bench", "judge", "--judge-url", url, "--judge-model", SERVED,
                 "--judge-max-tokens", "12", *common]) == 0
    judgment_file = capsys.readouterr().out.strip()
    judgments = [json.loads(line) for line in Path(judgment_file).read_text().splitlines()]
    assert [(j["turn"], j["judge"]) for j in judgments] == [
        (1, [SERVED, "single-math-v1"]), (2, [SERVED, "single-math-v1-multi-turn"])]
    reference = load_reference_answers(packaged_data_dir())[QUESTION]
    assert reference[0] in judgments[0]["user_prompt"] and first in judgments[0]["user_prompt"]
    assert reference[1] in judgments[1]["user_prompt"] and second in judgments[1]["user_prompt"]
    for j in judgments:
        assert j["judgment"] and j["score"] == parse_rating(j["judgment"])

    assert main(["eval", "mt-bench", "show", "--output", str(out_dir), "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    scores = [j["score"] for j in judgments if j["score"] != -1]
    if scores:  # a 135M judge often gives no [[rating]]; its judgments then count as failed
        (row,) = tables["models"]
        assert row["model"] == SERVED and row["judged"] == len(scores) and row["failed"] == 2 - len(scores)
        assert row["score"] == sum(scores) / len(scores)
    else:
        assert tables["models"][0]["failed"] == 2 and tables["models"][0]["judged"] == 0
    assert main(["eval", "mt-bench", "show", "--output", str(out_dir)]) == 0
    assert SERVED in capsys.readouterr().out
