// The worklist refreshes itself: it asks /api/worklist (same filters) every few seconds and
// rebuilds the rows with textContent only, so no value from a study is ever parsed as HTML.
"use strict";
(function () {
  const table = document.getElementById("worklist");
  const body = document.getElementById("rows");
  const updated = document.getElementById("updated");
  const stale = document.getElementById("stale");
  const empty = document.getElementById("empty");
  const every = Number(table.dataset.refreshMs) || 2000;

  function cell(row, text, href) {
    const td = document.createElement("td");
    if (href) {
      const a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text;
    }
    row.appendChild(td);
  }

  function render(data) {
    const rows = document.createDocumentFragment();
    for (const r of data.rows) {
      const tr = document.createElement("tr");
      tr.dataset.study = r.study_uid;
      const href = "/studies/" + encodeURIComponent(r.study_uid);
      cell(tr, String(r.rank));
      cell(tr, r.score === null ? "" : r.score.toFixed(3), href);
      cell(tr, r.operating_point);
      cell(tr, r.body_part);
      cell(tr, r.study_date);
      cell(tr, r.age + " ago");
      cell(tr, String(r.escalations));
      rows.appendChild(tr);
    }
    body.replaceChildren(rows);
    updated.textContent = data.updated;
    empty.hidden = data.rows.length > 0;
  }

  async function refresh() {
    try {
      const response = await fetch("/api/worklist" + window.location.search, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (response.status === 401) {
        window.location.assign("/signin?next=" + encodeURIComponent(window.location.pathname + window.location.search));
        return;
      }
      if (!response.ok) throw new Error(String(response.status));
      render(await response.json());
      stale.hidden = true;
    } catch (error) {
      stale.hidden = false;
    }
    window.setTimeout(refresh, every);
  }

  // Rows open their study.
  body.addEventListener("click", function (event) {
    const tr = event.target.closest("tr");
    if (tr && tr.dataset.study && !event.target.closest("a")) {
      window.location.assign("/studies/" + encodeURIComponent(tr.dataset.study));
    }
  });
  for (const id of ["point", "age"]) {
    document.getElementById(id).addEventListener("change", function () {
      document.getElementById("filters").submit();
    });
  }
  window.setTimeout(refresh, every);
})();
