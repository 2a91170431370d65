// The leaderboard page: ratings and 95% intervals computed by the server from the stored votes.
"use strict";

const fmt = (x) => (x === null ? "–" : x.toFixed(1));

fetch("/arena/api/leaderboard").then((r) => r.json()).then((board) => {
  const method = board.method === "bt" ? "Bradley-Terry" : "online Elo";
  document.getElementById("summary").textContent = board.votes === 0
    ? `No votes yet among ${board.contestants.length} contestants: go and battle!`
    : `${board.votes} ${board.votes === 1 ? "vote" : "votes"}, ${board.rows.length} rated models; ${method} ratings with ` +
      `${board.bootstrap_rounds} bootstrap rounds.`;
  if (board.rows.length === 0) return;
  const body = document.querySelector("#leaderboard tbody");
  for (const row of board.rows) {
    const tr = document.createElement("tr");
    const interval = row.rating === null || row.lower === null || row.upper === null ? "–"
      : `+${(row.upper - row.rating).toFixed(1)} / -${(row.rating - row.lower).toFixed(1)}`;
    for (const [text, cls] of [[String(row.rank), "number"], [row.model, ""], [fmt(row.rating), "number"],
                               [interval, "number"], [String(row.num_battles), "number"]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  document.getElementById("leaderboard").hidden = false;
  document.getElementById("chart").src = "/arena/leaderboard.png?votes=" + board.votes;
  document.getElementById("chart-figure").hidden = false;
});
