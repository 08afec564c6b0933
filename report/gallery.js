(function () {
  const $ = (id) => document.getElementById(id);
  const gallery = $("gallery");
  const cards = Array.from(gallery.querySelectorAll(".card"));
  const filters = { category: $("filter-category"), defect: $("filter-defect"), outcome: $("filter-outcome") };
  function applyFilters() {
    let shown = 0;
    for (const card of cards) {
      const keep = Object.entries(filters).every(([key, sel]) => !sel.value || card.dataset[key] === sel.value);
      card.hidden = !keep;
      shown += keep ? 1 : 0;
    }
    $("shown").textContent = shown + " of " + cards.length + " images";
  }
  function applySort() {
    const [key, dir] = $("sort").value.split(":");
    const sign = dir === "desc" ? -1 : 1;
    const value = (c) => (key === "score" ? parseFloat(c.dataset.score) : c.dataset.path);
    cards.sort((a, b) => { const x = value(a), y = value(b); return x < y ? -sign : x > y ? sign : 0; });
    gallery.append(...cards);
  }
  const viewer = $("viewer");
  function openViewer(card) {
    const figures = Array.from(card.querySelectorAll("img"), (img) => {
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
  gallery.addEventListener("click", (e) => { const card = e.target.closest(".card"); if (card) openViewer(card); });
  gallery.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.classList.contains("card")) openViewer(e.target);
  });
  viewer.addEventListener("click", () => { viewer.hidden = true; });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") viewer.hidden = true; });
  Object.values(filters).forEach((sel) => sel.addEventListener("change", applyFilters));
  $("sort").addEventListener("change", applySort);
  applyFilters();
  document.body.dataset.ready = "1";
})();
