// The leaderboard page: ratings and 95% intervals computed by the server from the stored votes.
"use strict";

const VIEWS = {
  "bt": "method=bt", "bt-style": "method=bt&style_control=true", "elo": "method=elo",
};
const fmt = (x) => (x === null ? "–" : x.toFixed(1));
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

async function show(view) {
  const query = VIEWS[view] || VIEWS.bt;
  const board = await (await fetch("/arena/api/leaderboard?" + query)).json();
  const summary = document.getElementById("summary");
  const table = document.getElementById("leaderboard");
  const figure = document.getElementById("chart-figure");
  const body = table.querySelector("tbody");
  body.replaceChildren();
  table.hidden = figure.hidden = true;
  if (board.votes === 0) {
    summary.textContent = `No votes yet among ${plural(board.contestants.length, "contestant")}: go and battle!`;
    return;
  }
  if (board.unavailable) {
    summary.textContent = `${plural(board.votes, "vote")}; ${board.view} ratings are not available yet: ` +
      board.unavailable + ".";
    return;
  }
  summary.textContent = `${plural(board.votes, "vote")}, ${plural(board.rows.length, "rated model")}; ` +
    `${board.view} ratings with ${board.bootstrap_rounds} bootstrap rounds.`;
  for (const row of board.rows) {
    const tr = document.createElement("tr");
    const interval = row.rating === null || row.lower === null || row.upper === null ? "–"
      : `+${(row.upper - row.rating).toFixed(1)} / -${(row.rating - row.lower).toFixed(1)}`;
    tr.append(cell(String(row.rank), "number"), cell(row.model), cell(fmt(row.rating), "number"),
              cell(interval, "number"), cell(String(row.num_battles), "number"));
    body.appendChild(tr);
  }
  table.hidden = false;
  // The figure appears once its chart has loaded (drawing it can take a moment), never as an empty frame.
  const chart = document.getElementById("chart");
  chart.onload = () => { figure.hidden = false; };
  chart.src = `/arena/leaderboard.png?${query}&votes=${board.votes}`;
}

const select = document.getElementById("view");
select.value = new URLSearchParams(location.search).get("view") || "bt";
select.addEventListener("change", () => {
  history.replaceState(null, "", "?view=" + select.value);
  show(select.value);
});
show(select.value);
