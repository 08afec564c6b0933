(function () {
  const $ = (id) => document.getElementById(id);
  const gallery = $("gallery");
  const cards = Array.from(gallery.querySelectorAll(".card"));
  // Every select "filter-<key>" keeps the cards whose data-<key> equals its value.
  const filters = Array.from(document.querySelectorAll("select[id^='filter-']"), (sel) => [sel.id.slice(7), sel]);
  function applyFilters() {
    let shown = 0;
    for (const card of cards) {
      const keep = filters.every(([key, sel]) => !sel.value || card.dataset[key] === sel.value);
      card.hidden = !keep;
      shown += keep ? 1 : 0;
    }
    $("shown").textContent = shown + " of " + cards.length + " images";
  }
  function applySort() {
    const [key, dir] = $("sort").value.split(":");
    const sign = dir === "desc" ? -1 : 1;
    const value = (c) => parseFloat(key === "score" ? c.dataset.score : c.dataset.order);
    cards.sort((a, b) => { const x = value(a), y = value(b); return x < y ? -sign : x > y ? sign : 0; });
    gallery.append(...cards);
  }
  const viewer = $("viewer");
  function openViewer(card) {
    const figures = Array.from(card.querySelectorAll(".imgs img"), (img) => {
      const fig = document.createElement("figure");
      const big = document.createElement("img");
      big.src = img.dataset.full;
      big.alt = img.alt;
      const cap = document.createElement("figcaption");
      cap.textContent = img.alt;
      fig.append(big, cap);
      return fig;
    });
    viewer.querySelector(".imgs").replaceChildren(...figures);
    viewer.querySelector(".caption").textContent = card.querySelector(".meta").innerText;
    viewer.hidden = false;
  }

  // Review marks: "good" (a false alarm) or "defect" (a miss), kept in localStorage under the
  // page's key (its models' versions and images) so that a reload or a later visit finds them.
  // The tab's window.name holds them too and wins on a reload: Chromium sometimes reloads a file://
  // page into a process whose localStorage is empty and whose writes are dropped later (measured:
  // 8 of 30 immediate reloads in headless Chromium 156), while window.name survives every reload.
  const review = $("review").dataset;
  function readJson(text) {  // an object, or {} for anything else (window.name may hold another page's text)
    try { const v = JSON.parse(text || "{}"); return v && typeof v === "object" && !Array.isArray(v) ? v : {}; }
    catch (e) { return {}; }
  }
  let marks = {};
  try { marks = readJson(localStorage.getItem(review.key)); } catch (e) { marks = {}; }
  const tabMarks = readJson(window.name)[review.key];
  function saveMarks() {
    try { localStorage.setItem(review.key, JSON.stringify(marks)); } catch (e) { /* private mode: the tab keeps them */ }
    const tab = readJson(window.name);
    tab[review.key] = marks;
    window.name = JSON.stringify(tab);
  }
  // the tab's copy wins, and is written back to localStorage in case this process lost it
  if (tabMarks && typeof tabMarks === "object") { marks = tabMarks; saveMarks(); }
  const markKey = (card) => card.dataset.category + "\n" + card.dataset.path;
  function showMark(card) {
    const mark = marks[markKey(card)] || "none";
    card.dataset.mark = mark;
    card.querySelectorAll("button.mark").forEach((b) => b.classList.toggle("on", b.dataset.set === mark));
  }
  function showCount() {
    const values = cards.map((c) => c.dataset.mark);
    const count = (m) => values.filter((v) => v === m).length;
    $("marked").textContent = count("good") + " good, " + count("defect") + " defect marked";
  }
  function setMark(card, mark) {
    if (mark) marks[markKey(card)] = mark; else delete marks[markKey(card)];
    saveMarks();
    cards.filter((c) => markKey(c) === markKey(card)).forEach(showMark);
    showCount();
  }
  function reviewJson() {
    const images = cards.filter((c) => c.dataset.mark !== "none").map((c) => ({
      path: c.dataset.path, category: c.dataset.category, mark: c.dataset.mark,
      score: parseFloat(c.dataset.score), model_version: c.dataset.version || null }));
    const seen = new Set();  // an image given twice on the command line is one mark
    return { format: review.format, report: review.report, model_version: review.version || null,
             paths_relative_to: review.paths || null, created: new Date().toISOString(),
             images: images.filter((i) => !seen.has(i.category + "\n" + i.path) && seen.add(i.category + "\n" + i.path)) };
  }
  $("download").addEventListener("click", () => {
    const blob = new Blob([JSON.stringify(reviewJson(), null, 1) + "\n"], { type: "application/json" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "review.json";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  });
  // load review.json: the marks of a downloaded file (another browser, another machine) onto the
  // cards it names; they replace those cards' marks, the others keep theirs.
  $("load-open").addEventListener("click", () => $("load").click());
  $("load").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (!file) return;
    file.text().then((text) => {
      e.target.value = "";
      let data = null;
      try { data = JSON.parse(text); } catch (err) { data = null; }
      if (!data || data.format !== review.format || !Array.isArray(data.images)) {
        $("loaded").textContent = file.name + ": not a review.json (format " + review.format + ")";
        return;
      }
      const onPage = new Set(cards.map(markKey));
      let applied = 0;
      data.images.forEach((i) => {
        const key = i && i.category + "\n" + i.path;
        if (onPage.has(key) && (i.mark === "good" || i.mark === "defect")) { marks[key] = i.mark; applied += 1; }
      });
      saveMarks();
      cards.forEach(showMark);
      showCount();
      applyFilters();
      $("loaded").textContent = applied + " marks loaded from " + file.name +
        (applied < data.images.length ? ", " + (data.images.length - applied) + " not on this page" : "");
    }).catch(() => { e.target.value = ""; $("loaded").textContent = file.name + ": could not be read"; });
  });
  function moveFocus(step) {
    const shown = cards.filter((c) => !c.hidden);
    if (!shown.length) return;
    const at = shown.indexOf(document.activeElement.closest ? document.activeElement.closest(".card") : null);
    const next = shown[at < 0 ? (step > 0 ? 0 : shown.length - 1) : Math.min(Math.max(at + step, 0), shown.length - 1)];
    next.focus({ preventScroll: true });
    next.scrollIntoView({ block: "nearest" });
  }

  gallery.addEventListener("click", (e) => {
    const card = e.target.closest(".card");
    if (!card) return;
    const button = e.target.closest("button.mark");
    if (button) {  // a second click on the set mark takes it off
      setMark(card, card.dataset.mark === button.dataset.set ? null : button.dataset.set);
      card.focus({ preventScroll: true });
    } else {
      openViewer(card);
    }
  });
  gallery.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.classList.contains("card")) openViewer(e.target);
  });
  viewer.addEventListener("click", () => { viewer.hidden = true; });
  const KEY_MARKS = { g: "good", d: "defect", u: null };
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { viewer.hidden = true; return; }
    if (e.ctrlKey || e.metaKey || e.altKey || /^(SELECT|INPUT|TEXTAREA)$/.test(e.target.tagName)) return;
    if (e.key === "j" || e.key === "k") { moveFocus(e.key === "j" ? 1 : -1); e.preventDefault(); return; }
    const card = document.activeElement && document.activeElement.closest && document.activeElement.closest(".card");
    if (card && e.key in KEY_MARKS) { setMark(card, KEY_MARKS[e.key]); e.preventDefault(); }
  });
  filters.forEach(([, sel]) => sel.addEventListener("change", applyFilters));
  $("sort").addEventListener("change", applySort);
  cards.forEach(showMark);
  showCount();
  applyFilters();
  document.body.dataset.ready = "1";
})();
