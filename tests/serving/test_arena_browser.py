"""The Arena's pages driven end to end in headless Chromium (Debian's `chromium`, through Playwright).

A person's path: type a prompt, watch both anonymous answers stream in, vote, see the names, open the
leaderboard; then the vote is looked up in the SQLite database. Screenshots of both pages go to
$JVILA_SCREENSHOT_DIR when it is set (to look at them), else to the test's temporary folder.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # a failure, not a skip: the test must run wherever the suite runs
    pytest.fail("the Arena's browser test needs Playwright: `make install` (or pip install -e '.[test]')",
                pytrace=False)

from arena_server import SYSTEMS, arena_server, write_contestants
from live_server import tiny_model, tiny_tokenizer

CHROMIUM = "/usr/bin/chromium"
ANSWER_TOKENS = 12  # enough that each answer arrives over several engine steps

# Records, at every change of an answer box, its text length and whether it was still streaming.
_WATCH_ANSWERS = """
window.__seen = {a: [], b: []};
for (const side of ["a", "b"]) {
  const box = document.getElementById("answer-" + side);
  new MutationObserver(() => window.__seen[side].push(
    [box.textContent.length, box.classList.contains("streaming")]
  )).observe(box, {childList: true, characterData: true, subtree: true, attributes: true});
}
"""


def _browser(playwright):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: the Arena's browser test needs Debian's chromium. Install it with "
                    "`make install` (as root, with apt-get) or `apt-get install -y chromium`.")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


def test_a_person_battles_votes_and_finds_the_leaderboard(tmp_path):
    shots = Path(os.environ.get("JVILA_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    _, graphdef, state = tiny_model(tokenizer.vocab_size)
    database = str(tmp_path / "arena.db")
    winner_button, winner = random.choice([("#vote-a", "model_a"), ("#vote-b", "model_b"), ("#vote-tie", "tie"),
                                           ("#vote-bothbad", "tie (bothbad)")])
    with (arena_server(tokenizer, graphdef, state, database, write_contestants(tmp_path / "c.json"),
                       max_tokens=ANSWER_TOKENS) as (server, arena, engine),
          sync_playwright() as playwright):
        # The tiny model answers in a blink; a pause per engine step makes it as slow as a real one, so
        # that the answers reach the page over many reads (this asserts nothing about time).
        step = engine.step

        def slow_step():
            time.sleep(0.06)
            return step()

        engine.step = slow_step
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 1200, "height": 860})
        # Generous: the first answers wait for XLA compilations, slow on a loaded two-core machine.
        page.set_default_timeout(300_000)
        page.goto(f"{server.url}/arena")
        page.wait_for_function("document.getElementById('arena-info').textContent.includes('2 contestants')")
        for button in ("#vote-a", "#vote-b", "#vote-tie", "#vote-bothbad"):
            assert page.is_disabled(button)
        page.evaluate(_WATCH_ANSWERS)

        page.fill("#prompt", "What is the capital of France? Answer in one short sentence.")
        page.click("#send")
        # Voting opens only once both answers are complete.
        page.wait_for_selector("#vote-a:enabled")
        battle_id = page.evaluate("document.body.dataset.battleId")
        answers = {side: page.text_content(f"#answer-{side}") for side in "ab"}
        assert page.text_content("#name-a") == "Model A" and page.text_content("#name-b") == "Model B"
        stored = arena.store.get(battle_id)
        assert (stored.answer_a, stored.answer_b) == (answers["a"], answers["b"])
        # Streamed: some side was seen on screen with part of its text while still streaming.
        seen = page.evaluate("window.__seen")
        final = {side: len(answers[side]) for side in "ab"}
        partial = [(side, n) for side in "ab" for n, streaming in seen[side] if streaming and 0 < n < final[side]]
        assert partial, (seen, final)
        page.screenshot(path=str(shots / "arena_answered.png"))

        page.click(winner_button)
        page.wait_for_selector("#name-a.revealed")
        revealed = {side: page.text_content(f"#name-{side}") for side in "ab"}
        assert revealed == {"a": f"Model A: {stored.contestant_a}", "b": f"Model B: {stored.contestant_b}"}
        assert {stored.contestant_a, stored.contestant_b} == set(SYSTEMS)
        for button in ("#vote-a", "#vote-b", "#vote-tie", "#vote-bothbad"):
            assert page.is_disabled(button)
        assert "Thanks for voting" in page.text_content("#status")
        page.screenshot(path=str(shots / "arena_voted.png"))

        page.click("text=Leaderboard")
        page.wait_for_selector("#leaderboard tbody tr")
        page.wait_for_function("document.getElementById('chart').complete && "
                               "document.getElementById('chart').naturalWidth > 0")
        rows = page.eval_on_selector_all("#leaderboard tbody tr",
                                         "rows => rows.map(r => Array.from(r.cells, c => c.textContent))")
        assert sorted(row[1] for row in rows) == sorted(SYSTEMS) and all(row[4] == "1" for row in rows)
        assert page.text_content("#summary").startswith("1 vote, 2 rated models; Bradley-Terry")
        page.screenshot(path=str(shots / "leaderboard.png"), full_page=True)
        # Other views of the same votes: online Elo; style control needs answers that differ in style first.
        page.select_option("#view", "elo")
        page.wait_for_function("document.getElementById('summary').textContent.includes('online Elo')")
        assert page.eval_on_selector_all("#leaderboard tbody tr", "rows => rows.length") == 2
        page.select_option("#view", "bt-style")
        page.wait_for_function("document.getElementById('summary').textContent.includes('not available yet')")
        assert page.is_hidden("#leaderboard")
        browser.close()

    # The vote, as any SQLite client finds it.
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT battle_id, winner FROM arena_votes").fetchall() == [(battle_id, winner)]
