// The battle page: send a prompt, stream both anonymous answers side by side, vote, then see the names.
"use strict";

const $ = (id) => document.getElementById(id);
const voteButtons = Array.from(document.querySelectorAll("#votes button"));
let battleId = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

function resetSides() {
  for (const side of ["a", "b"]) {
    $("answer-" + side).textContent = "";
    $("answer-" + side).className = "answer";
    $("name-" + side).textContent = "Model " + side.toUpperCase();
    $("name-" + side).classList.remove("revealed");
    $("side-" + side).classList.remove("winner");
  }
}

// Server-sent events from a POST: read the body as it arrives and hand on each `data:` payload.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
      }
    }
  }
}

async function startBattle(prompt) {
  resetSides();
  voteButtons.forEach((b) => (b.disabled = true));
  $("send").disabled = true;
  $("prompt").disabled = true;
  setStatus("Drawing two contestants…");
  const created = await fetch("/arena/api/battles", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ prompt }),
  });
  if (!created.ok) {
    setStatus(await errorMessage(created), true);
    $("send").disabled = false;
    $("prompt").disabled = false;
    return;
  }
  battleId = (await created.json()).battle_id;
  document.body.dataset.battleId = battleId;
  setStatus("Both models are answering…");
  const answers = await fetch(`/arena/api/battles/${battleId}/answers`, { method: "POST" });
  if (!answers.ok) {
    setStatus(await errorMessage(answers), true);
    $("new-battle").hidden = false;
    return;
  }
  const finished = { a: false, b: false };
  let failed = false;
  ["a", "b"].forEach((s) => $("answer-" + s).classList.add("streaming"));
  await readEvents(answers, (event) => {
    if (!event.side) return;
    const box = $("answer-" + event.side);
    if (event.text) box.textContent += event.text;
    if (event.done) {
      finished[event.side] = true;
      box.classList.remove("streaming");
      box.dataset.done = "true";
    }
    if (event.error) {
      failed = true;
      box.classList.remove("streaming");
      box.classList.add("error");
      box.textContent += "\n[error: " + event.error + "]";
    }
  });
  if (finished.a && finished.b && !failed) {
    voteButtons.forEach((b) => (b.disabled = false));
    setStatus("Which answer is better? Vote to see who is who.");
  } else {
    setStatus("An answer did not complete; this battle cannot be voted on.", true);
    $("new-battle").hidden = false;
  }
}

async function vote(winner) {
  voteButtons.forEach((b) => (b.disabled = true));
  const response = await fetch(`/arena/api/battles/${battleId}/vote`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ winner }),
  });
  if (!response.ok) {
    setStatus(await errorMessage(response), true);
    return;
  }
  const battle = await response.json();
  for (const side of ["a", "b"]) {
    $("name-" + side).textContent = "Model " + side.toUpperCase() + ": " + battle["model_" + side];
    $("name-" + side).classList.add("revealed");
  }
  if (winner === "model_a" || winner === "model_b") $("side-" + winner.slice(-1)).classList.add("winner");
  setStatus("Thanks for voting! See the leaderboard, or start a new battle.");
  $("new-battle").hidden = false;
  $("send").hidden = true;
}

$("prompt-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  if (prompt) startBattle(prompt).catch((err) => setStatus(String(err), true));
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("prompt-form").requestSubmit();
});
voteButtons.forEach((b) => b.addEventListener("click", () => vote(b.dataset.winner)));
$("new-battle").addEventListener("click", () => {
  battleId = null;
  resetSides();
  voteButtons.forEach((b) => (b.disabled = true));
  $("prompt").value = "";
  $("prompt").disabled = false;
  $("send").disabled = false;
  $("send").hidden = false;
  $("new-battle").hidden = true;
  setStatus("");
  $("prompt").focus();
});

fetch("/arena/api/info").then((r) => r.json()).then((info) => {
  $("arena-info").textContent = `${info.contestants.length} contestants, ${info.votes} ${info.votes === 1 ? "vote" : "votes"} so far.`;
  $("prompt").maxLength = info.max_prompt_chars;
});
