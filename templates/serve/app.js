// vlm-xray page: upload -> POST /v1/predict -> render report, charts, heatmaps, downloads.
// Vanilla JS, no network beyond this origin. The threshold slider re-classifies locally.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = { file: null, result: null, threshold: null, busy: false };

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }
  const pct = (x) => (100 * x).toFixed(1) + "%";
  const name = (f) => f.display || f.label;

  function banner(kind, title, detail) {
    const b = el("div", { class: "banner " + kind, role: kind === "error" ? "alert" : "status" },
      el("strong", { text: title }), el("span", { text: " " + (detail || "") }));
    const close = el("button", { class: "banner-close", "aria-label": "dismiss", text: "×" });
    close.addEventListener("click", () => b.remove());
    b.append(close);
    $("banners").append(b);
    return b;
  }
  function clearBanners() { $("banners").replaceChildren(); }

  function headers() {
    const h = {};
    const key = $("api-key");
    if (key && key.value) h["X-API-Key"] = key.value;
    return h;
  }

  // ------------------------------------------------------------------ readiness
  function pollReady() {
    if (document.body.dataset.ready === "true") return;
    fetch("/readyz").then((r) => { if (r.ok) location.reload(); else setTimeout(pollReady, 2000); })
      .catch(() => setTimeout(pollReady, 4000));
  }

  // ------------------------------------------------------------------ file choice
  function chooseFile(file) {
    if (!file) return;
    state.file = file;
    $("file-name").hidden = false;
    $("file-name").textContent = file.name + " · " + (file.size / 1e6).toFixed(2) + " MB";
    $("analyze").disabled = state.busy || document.body.dataset.ready !== "true";
    const limit = Number(document.body.dataset.maxUploadMb) * 1048576;
    if (file.size > limit) banner("error", "File too large.", "The limit is " + document.body.dataset.maxUploadMb + " MB.");
  }

  function setupUpload() {
    const dz = $("dropzone");
    const input = $("file-input");
    dz.addEventListener("click", () => input.click());
    dz.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
    input.addEventListener("change", () => chooseFile(input.files[0]));
    for (const ev of ["dragenter", "dragover"]) dz.addEventListener(ev, (e) => { e.preventDefault(); dz.classList.add("over"); });
    for (const ev of ["dragleave", "drop"]) dz.addEventListener(ev, (e) => { e.preventDefault(); dz.classList.remove("over"); });
    dz.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
    $("analyze").addEventListener("click", analyze);
  }

  // ------------------------------------------------------------------ request
  function progress(fraction, text) {
    $("progress").hidden = fraction === null;
    if (fraction === null) return;
    $("progress-fill").style.width = Math.round(100 * fraction) + "%";
    $("progress-fill").classList.toggle("indeterminate", fraction >= 1);
    $("progress-text").textContent = text;
  }

  function analyze() {
    if (!state.file || state.busy) return;
    clearBanners();
    state.busy = true;
    $("analyze").disabled = true;
    const form = new FormData();
    form.append("file", state.file, state.file.name);
    form.append("labels", $("labels-select").value);
    form.append("heatmaps", $("opt-heatmaps").checked ? "true" : "false");
    form.append("heatmap_alpha", "1.0"); // colour layer; the opacity control blends it in the browser
    form.append("ood", $("opt-ood").checked ? "warn" : "off");
    form.append("charts", "true");
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/predict");
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) progress(e.loaded / e.total * 0.999, "Uploading… " + pct(e.loaded / e.total)); };
    xhr.upload.onload = () => progress(1, "Scoring on the server (variants × prompt styles" + ($("opt-heatmaps").checked ? ", heatmaps" : "") + ")…");
    xhr.onload = () => finish(xhr.status, xhr.responseText, xhr.getResponseHeader("Retry-After"));
    xhr.onerror = () => finish(0, "", null);
    progress(0, "Uploading…");
    xhr.send(form);
  }

  function finish(status, text, retryAfter) {
    state.busy = false;
    progress(null);
    $("analyze").disabled = !state.file;
    let body = null;
    try { body = JSON.parse(text); } catch (e) { body = null; }
    if (status === 200 && body) { show(body); return; }
    if (status === 0) { banner("error", "No answer from the server.", "Is vlm-xray serve still running?"); return; }
    const title = { 401: "API key required.", 413: "File too large.", 415: "Not a supported image.",
      422: body && body.error === "out_of_distribution" ? "Rejected as out of distribution." : "The image could not be used.",
      503: "The server is busy." }[status] || ("Request failed (" + status + ").");
    const detail = (body && body.detail) || "";
    banner("error", title, detail + (retryAfter ? " Retry in " + retryAfter + " s." : ""));
  }

  // ------------------------------------------------------------------ rendering
  function effectiveThreshold(f) { return state.threshold === null ? f.threshold : state.threshold; }
  function isPositive(f) { return f.probability >= effectiveThreshold(f); }

  function show(result) {
    state.result = result;
    state.threshold = null;
    $("empty-state").hidden = true;
    $("results").hidden = false;
    const slider = $("threshold");
    slider.disabled = false;
    $("threshold-reset").disabled = false;
    slider.value = result.threshold === null ? 0.5 : result.threshold;
    $("threshold-value").textContent = result.threshold === null ? "per-label" : Number(result.threshold).toFixed(2);
    $("result-title").textContent = "Findings — " + result.image;
    const meta = [result.model, result.label_set, result.variants.length + " variants × " + result.prompt_styles.length + " prompt styles"];
    if (result.size) meta.push(result.size[0] + "×" + result.size[1] + " px");
    if (result.view) meta.push("view " + result.view);
    $("result-meta").textContent = meta.join(" · ");
    if (result.ood && result.ood.available && result.ood.in_distribution === false)
      banner("warning", "This image may be outside what the model was made for.", result.ood.reason + " Treat every score below with extra caution.");
    else if (result.ood && !result.ood.available)
      banner("info", "No out-of-distribution check for this model/label set.", result.ood.reason);
    const warnings = result.input_warnings || [];
    $("input-warnings").replaceChildren(...warnings.map((w) => el("div", { class: "banner info inline", text: "Input: " + w })));
    renderCalls();
    renderCharts(result.charts);
    renderHeatmaps(result);
  }

  function renderCalls() {
    const r = state.result;
    const tbody = $("findings-body");
    const rows = [];
    const byCategory = {};
    for (const f of r.findings) (byCategory[f.category || "Other"] = byCategory[f.category || "Other"] || []).push(f);
    for (const [cat, fs] of Object.entries(byCategory)) {
      rows.push(el("tr", { class: "group-row" }, el("td", { colspan: "6", text: cat })));
      for (const f of fs) {
        const pos = isPositive(f);
        const thr = effectiveThreshold(f);
        const bar = el("div", { class: "pbar" }, el("div", { class: "pfill" + (pos ? " pos" : "") }), el("div", { class: "pthr" }));
        bar.firstChild.style.width = pct(f.probability);
        bar.lastChild.style.left = pct(thr);
        rows.push(el("tr", { class: "finding-row" + (pos ? " positive" : ""), "data-label": f.label },
          el("td", { class: "fname", text: name(f) }), el("td", { class: "muted", text: f.category || "" }),
          el("td", { class: "bar-col" }, el("span", { class: "pnum", text: f.probability.toFixed(3) }), bar),
          el("td", { class: "muted", text: f.uncertainty.toFixed(3) }), el("td", { class: "muted", text: thr.toFixed(2) }),
          el("td", { class: "call" }, el("span", { class: pos ? "badge pos" : "badge neg", text: pos ? "POSITIVE" : "negative" }))));
      }
    }
    tbody.replaceChildren(...rows);
    const positives = r.findings.filter(isPositive).sort((a, b) => (b.severity - a.severity) || (b.probability - a.probability));
    $("impression").replaceChildren(...(positives.length ? positives.map((f) => el("li", {},
      el("strong", { text: name(f) }), el("span", { text: " — probability " + f.probability.toFixed(2) + " (± " + f.uncertainty.toFixed(2) + "), threshold " + effectiveThreshold(f).toFixed(2) })))
      : [el("li", { class: "muted", text: "No finding reaches its threshold." })]));
    $("positive-count").textContent = positives.length + " of " + r.findings.length + " positive";
    updateProbabilityChart();
  }

  // ------------------------------------------------------------------ charts (figures from vlm/report.py)
  function renderCharts(charts) {
    if (!charts || typeof Plotly === "undefined") return;
    for (const [key, fig] of Object.entries(charts)) {
      const div = $("chart-" + key);
      if (!div) continue;
      // the figure's long title becomes the card heading, so it wraps instead of being clipped
      const title = fig.layout.title ? (fig.layout.title.text || fig.layout.title) : "";
      const heading = div.previousElementSibling;
      if (heading && heading.classList.contains("chart-title")) heading.textContent = title;
      else div.before(el("h3", { class: "chart-title", text: title }));
      const margin = Object.assign({}, fig.layout.margin, { t: 16 });
      Plotly.react(div, fig.data, Object.assign({}, fig.layout, { title: { text: "" }, margin: margin, autosize: true }),
        { displaylogo: false, responsive: true });
    }
  }

  function updateProbabilityChart() {
    const div = $("chart-probabilities");
    if (!div || !div.data || typeof Plotly === "undefined") return;
    const byName = {};
    for (const f of state.result.findings) byName[name(f)] = f;
    const names = div.data[0].y;
    const colors = names.map((n) => (isPositive(byName[n]) ? "#b42318" : "#98a2b3"));
    const thresholds = names.map((n) => effectiveThreshold(byName[n]));
    Plotly.restyle(div, { "marker.color": [colors] }, [0]);
    Plotly.restyle(div, { x: [thresholds] }, [1]);
    Plotly.relayout(div, { shapes: [], annotations: [] });
  }

  function onThreshold() {
    if (!state.result) return;
    state.threshold = Number($("threshold").value);
    $("threshold-value").textContent = state.threshold.toFixed(2);
    renderCalls();
  }

  // ------------------------------------------------------------------ heatmaps
  function renderHeatmaps(result) {
    const select = $("heatmap-select");
    const maps = result.heatmaps || [];
    select.replaceChildren(...maps.map((h, i) => el("option", { value: String(i), text: h.label })));
    $("heatmap-view").hidden = maps.length === 0;
    select.disabled = maps.length === 0;
    if (!("heatmaps" in result)) $("heatmap-note").textContent = "Heatmaps were not requested.";
    else if (result.heatmaps_unavailable) $("heatmap-note").textContent = "Heatmaps unavailable: " + result.heatmaps_unavailable;
    else if (maps.length === 0) $("heatmap-note").textContent = "No positive finding at the server's thresholds, so no heatmap was made.";
    else $("heatmap-note").textContent = "Method: " + maps[0].method + ". Saliency shows what moved the score, which may be a shortcut; it is not a localisation.";
    if (maps.length) {
      $("heatmap-base").src = "data:image/png;base64," + result.heatmap_base_png_base64;
      showHeatmap();
    }
  }
  function showHeatmap() {
    const maps = state.result.heatmaps || [];
    const h = maps[Number($("heatmap-select").value) || 0];
    if (!h) return;
    $("heatmap-overlay").src = "data:image/png;base64," + h.png_base64;
    $("heatmap-overlay").alt = "heatmap of " + h.label;
    const o = Number($("heatmap-opacity").value);
    $("heatmap-overlay").style.opacity = o;
    $("heatmap-opacity-value").textContent = Math.round(100 * o) + "%";
  }

  // ------------------------------------------------------------------ tabs + downloads
  function setupTabs() {
    const tabs = document.querySelectorAll("[role=tab]");
    tabs.forEach((tab) => tab.addEventListener("click", () => {
      tabs.forEach((t) => { t.setAttribute("aria-selected", String(t === tab)); $(t.getAttribute("aria-controls")).hidden = t !== tab; });
      if (tab.id === "tab-vis" && typeof Plotly !== "undefined")
        document.querySelectorAll(".chart").forEach((d) => { if (d.data) Plotly.Plots.resize(d); });
    }));
  }

  function save(blob, filename) {
    const a = el("a", { href: URL.createObjectURL(blob), download: filename });
    document.body.append(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }
  function coreResult() {
    const r = Object.assign({}, state.result);
    for (const k of ["charts", "heatmaps", "heatmap_base_png_base64", "heatmaps_unavailable"]) delete r[k];
    return r;
  }
  function atSliderThreshold() {
    const r = coreResult();
    r.findings = r.findings.map((f) => Object.assign({}, f, { positive: isPositive(f), threshold: effectiveThreshold(f) }));
    if (state.threshold !== null) r.threshold = state.threshold;
    return r;
  }
  function csv() {
    const cols = ["image", "label", "display", "category", "probability", "uncertainty", "threshold", "positive", "model", "label_set"];
    const q = (v) => { const s = String(v); return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; };
    const r = atSliderThreshold();
    const lines = [cols.join(",")].concat(r.findings.map((f) => [r.image, f.label, f.display, f.category, f.probability,
      f.uncertainty, f.threshold, f.positive, r.model, r.label_set].map(q).join(",")));
    return lines.join("\n") + "\n";
  }
  function setupDownloads() {
    $("dl-json").addEventListener("click", () => save(new Blob([JSON.stringify(coreResult(), null, 2)], { type: "application/json" }), state.result.image_id + ".json"));
    $("dl-csv").addEventListener("click", () => save(new Blob([csv()], { type: "text/csv" }), state.result.image_id + ".findings.csv"));
    $("dl-html").addEventListener("click", () => {
      fetch("/v1/report/from-result", { method: "POST", headers: Object.assign({ "Content-Type": "application/json" }, headers()), body: JSON.stringify(atSliderThreshold()) })
        .then((r) => (r.ok ? r.blob() : r.json().then((b) => { throw new Error(b.detail || r.status); })))
        .then((blob) => save(blob, state.result.image_id + ".html"))
        .catch((e) => banner("error", "Report failed.", String(e.message || e)));
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupUpload();
    setupTabs();
    setupDownloads();
    $("threshold").addEventListener("input", onThreshold);
    $("threshold-reset").addEventListener("click", () => { if (!state.result) return; state.threshold = null; $("threshold-value").textContent = "model"; renderCalls(); });
    $("heatmap-select").addEventListener("change", showHeatmap);
    $("heatmap-opacity").addEventListener("input", showHeatmap);
    pollReady();
  });
})();
