"""`jvila generate` end to end on the embedded default model, and its errors."""

from jvila.cli import main


def test_generate_prints_the_completion_alone(capsys, caplog):
    assert main(["generate", "--model", "smollm2-135m-instruct", "--max-tokens", "12",
                 "What is the capital of France?"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert len(out.strip().splitlines()) == 1  # nothing but the completion on stdout
    assert "generated" in caplog.text  # progress goes to the log (stderr), not stdout


# Long enough that this prompt (47 tokens; 41 to 56 would do) + 8 new ones falls in the same prefill, page-table
# and pool buckets as the test above (37 + 12): this generate reuses its compiled engine steps (about 15 s).
ONE_WORD = ("You are a helpful assistant who answers every question in exactly one word: no sentence, no "
            "explanation, no punctuation, no greeting, nothing else.")


def test_system_message_and_sampling_run(capsys):
    assert main(["generate", "--model", "smollm2-135m-instruct", "--max-tokens", "8", "--temperature", "0.7",
                 "--system", ONE_WORD, "Name a color."]) == 0
    assert capsys.readouterr().out.strip()


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["generate", "--model", "no-such-model", "hi"]) == 1
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m-instruct" in err


def test_max_tokens_must_be_positive(capsys):
    assert main(["generate", "--model", "smollm2-135m-instruct", "--max-tokens", "0", "hi"]) == 2
    assert "--max-tokens" in capsys.readouterr().err
