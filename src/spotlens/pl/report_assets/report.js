/* spotlens report: the spots over an OpenSeadragon image pyramid.
 *
 * Spots live in image pixels of the pyramid's full level. They are drawn on one canvas over the
 * viewer, one path per colour (64 steps of a continuous scale, one per category), skipping spots
 * outside the view; the hover read-out looks the pointer up in a grid index of the spots.
 * Opening the file with "#selftest" draws every layer once and records what was drawn in
 * <body data-selftest>, which the tests read.
 */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("spotlens-data").textContent);
  var body = document.body;
  var MISSING16 = 65535;
  var NA_COLOR = "#c8c8c8";
  var STEPS = 64;
  window.addEventListener("error", function (e) { body.dataset.error = String(e.message); });

  function decode(text, Type) {
    var bin = atob(text), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Type(bytes.buffer);
  }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
    var a = Math.abs(v);
    if (a !== 0 && (a < 0.001 || a >= 1e5)) return v.toExponential(2);
    return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(3);
  }

  // ---- data ---------------------------------------------------------------------------------
  var S = DATA.spots, N = S.n;
  var X = decode(S.x, Float32Array), Y = decode(S.y, Float32Array);
  var LAYERS = DATA.layers;
  LAYERS.forEach(function (layer, i) {
    layer.index = i;
    layer.codes = layer.kind === "continuous" ? decode(layer.values, Uint16Array)
      : decode(layer.values, layer.dtype === "u16" ? Uint16Array : Uint8Array);
    layer.missing = layer.kind === "continuous" || layer.dtype === "u16" ? 65535 : 255;
  });
  var dominant = LAYERS.filter(function (l) { return l.name === "dominant cell type"; })[0];
  var proportionLayers = LAYERS.filter(function (l) { return l.group === "proportions"; });
  var qcLayers = LAYERS.filter(function (l) { return l.group === "QC"; });
  var stdOf = {};
  LAYERS.forEach(function (l) { if (l.std_of) stdOf[l.std_of] = l; });
  var CELLS = DATA.cells;
  if (CELLS) {
    CELLS.X = decode(CELLS.x, Float32Array);
    CELLS.Y = decode(CELLS.y, Float32Array);
    CELLS.codes = decode(CELLS.values, CELLS.dtype === "u16" ? Uint16Array : Uint8Array);
    CELLS.missing = CELLS.dtype === "u16" ? 65535 : 255;
  }

  function value(layer, i) {
    var c = layer.codes[i];
    if (c === layer.missing) return NaN;
    return layer.kind === "continuous" ? layer.lo + (c / 65534) * (layer.hi - layer.lo) : c;
  }

  // Spots sorted by colour bucket: order[starts[b] .. starts[b + 1]) hold bucket b.
  function buckets(codes, missing, n, nBuckets, bucketOf) {
    var bucket = new Uint16Array(n), counts = new Int32Array(nBuckets + 1);
    for (var i = 0; i < n; i++) {
      var c = codes[i], b = c === missing ? nBuckets : bucketOf(c);
      bucket[i] = b;
      counts[b]++;
    }
    var starts = new Int32Array(nBuckets + 2);
    for (var b2 = 0; b2 <= nBuckets; b2++) starts[b2 + 1] = starts[b2] + counts[b2];
    var fill = starts.slice(0, nBuckets + 1), order = new Int32Array(n);
    for (var j = 0; j < n; j++) order[fill[bucket[j]]++] = j;
    return { order: order, starts: starts };
  }
  function prepare(layer) {
    if (layer.prepared) return layer.prepared;
    var colors, sorted;
    if (layer.kind === "continuous") {
      var lut = DATA.luts[layer.scale], span = layer.hi - layer.lo;
      var c0 = (layer.vmin - layer.lo) / span * 65534, c1 = (layer.vmax - layer.lo) / span * 65534;
      var width = Math.max(c1 - c0, 1e-9);
      sorted = buckets(layer.codes, MISSING16, N, STEPS, function (c) {
        return Math.max(0, Math.min(STEPS - 1, Math.floor((c - c0) / width * STEPS)));
      });
      colors = lut.concat([NA_COLOR]);
    } else {
      var k = layer.categories.length;
      sorted = buckets(layer.codes, layer.missing, N, k, function (c) { return c; });
      colors = layer.colors.concat([NA_COLOR]);
    }
    layer.prepared = { order: sorted.order, starts: sorted.starts, colors: colors };
    return layer.prepared;
  }

  // ---- grid index for the hover read-out ----------------------------------------------------
  var GRID = (function () {
    var x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (var i = 0; i < N; i++) {
      if (!(X[i] === X[i]) || !(Y[i] === Y[i])) continue;
      x0 = Math.min(x0, X[i]); x1 = Math.max(x1, X[i]); y0 = Math.min(y0, Y[i]); y1 = Math.max(y1, Y[i]);
    }
    var cell = Math.max(S.diameter, (Math.max(x1 - x0, y1 - y0) || 1) / 1024, 1e-6);
    var nx = Math.floor((x1 - x0) / cell) + 1, ny = Math.floor((y1 - y0) / cell) + 1;
    var key = new Int32Array(N), counts = new Int32Array(nx * ny + 1);
    for (var j = 0; j < N; j++) {
      key[j] = X[j] === X[j] ? Math.floor((Y[j] - y0) / cell) * nx + Math.floor((X[j] - x0) / cell) : nx * ny;
      counts[key[j]]++;
    }
    var starts = new Int32Array(nx * ny + 2);
    for (var c = 0; c <= nx * ny; c++) starts[c + 1] = starts[c] + counts[c];
    var fill = starts.slice(0, nx * ny + 1), order = new Int32Array(N);
    for (var m = 0; m < N; m++) order[fill[key[m]]++] = m;
    return { x0: x0, y0: y0, x1: x1, y1: y1, cell: cell, nx: nx, ny: ny, starts: starts, order: order };
  })();
  function nearest(px, py) {
    var g = GRID, gx = Math.floor((px - g.x0) / g.cell), gy = Math.floor((py - g.y0) / g.cell);
    var best = -1, bestD = Infinity, reach = S.diameter * 0.6;
    for (var dy = -1; dy <= 1; dy++) {
      for (var dx = -1; dx <= 1; dx++) {
        var cx = gx + dx, cy = gy + dy;
        if (cx < 0 || cy < 0 || cx >= g.nx || cy >= g.ny) continue;
        var c = cy * g.nx + cx;
        for (var k = g.starts[c]; k < g.starts[c + 1]; k++) {
          var i = g.order[k], d = Math.hypot(X[i] - px, Y[i] - py);
          if (d < bestD) { bestD = d; best = i; }
        }
      }
    }
    return bestD <= reach ? best : -1;
  }

  // ---- viewer --------------------------------------------------------------------------------
  var IMG = DATA.image;
  var tilesLoaded = 0;
  body.dataset.tilesLoaded = "0";
  var viewer = OpenSeadragon({
    element: document.getElementById("viewer"),
    tileSources: {
      width: IMG.width, height: IMG.height, tileSize: IMG.tile_size, tileOverlap: 0,
      minLevel: IMG.min_level, maxLevel: IMG.max_level,
      getTileUrl: function (level, x, y) {
        // tiles beside the page (a large image): <stem>_files/<level>/<col>_<row>.jpg, relative
        if (IMG.folder) return IMG.folder + "/" + level + "/" + x + "_" + y + "." + IMG.format;
        var rows = IMG.tiles[String(level)];
        return rows && rows[y] && rows[y][x] ? "data:image/jpeg;base64," + rows[y][x] : "";
      },
      getTileHashKey: function (level, x, y) { return "spotlens/" + level + "/" + x + "_" + y; }
    },
    drawer: "canvas",
    showNavigationControl: false,
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    navigatorSizeRatio: 0.14,
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.2,
    preserveImageSizeOnResize: true,  // a resized window keeps the view's scale and centre
    animationTime: 0.6,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true }
  });
  viewer.addHandler("tile-loaded", function () { body.dataset.tilesLoaded = String(++tilesLoaded); });
  var tilesFailed = 0;  // e.g. a tile folder not kept beside the page
  viewer.addHandler("tile-load-failed", function () { body.dataset.tilesFailed = String(++tilesFailed); });

  var canvas = el("canvas", { "class": "spots-canvas" });
  var ctx = canvas.getContext("2d");
  var state = { layer: null, opacity: 0.85, cells: false, hover: -1 };

  function affine() {
    var vp = viewer.viewport;
    var p0 = vp.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
    var p1 = vp.pixelFromPoint(new OpenSeadragon.Point(1, 0), true);
    return { ox: p0.x, oy: p0.y, k: (p1.x - p0.x) / IMG.width };
  }
  function drawPoints(xs, ys, prep, radius, square, a, dpr, W, H) {
    var drawn = 0, k = a.k * dpr, ox = a.ox * dpr, oy = a.oy * dpr, r = radius * k;
    var round = !square && r > 1.5, side = Math.max(2 * r, 1);
    for (var b = 0; b < prep.colors.length; b++) {
      var color = prep.colors[b];
      if (!color) continue;
      ctx.fillStyle = color;
      ctx.beginPath();
      for (var j = prep.starts[b]; j < prep.starts[b + 1]; j++) {
        var i = prep.order[j], sx = ox + xs[i] * k, sy = oy + ys[i] * k;
        if (sx < -r || sy < -r || sx > W + r || sy > H + r) continue;
        if (round) { ctx.moveTo(sx + r, sy); ctx.arc(sx, sy, r, 0, 6.283185307179586); }
        else ctx.rect(sx - side / 2, sy - side / 2, side, side);
        drawn++;
      }
      ctx.fill();
    }
    return drawn;
  }
  function draw() {
    var t0 = performance.now();
    var host = viewer.canvas, dpr = window.devicePixelRatio || 1;
    var w = host.clientWidth, h = host.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
      canvas.style.width = w + "px"; canvas.style.height = h + "px";
    }
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    var a = affine(), drawn = 0, cellsDrawn = 0;
    ctx.globalAlpha = state.opacity;
    if (state.layer) {
      drawn = drawPoints(X, Y, prepare(state.layer), S.diameter / 2, S.shape === "square",
                         a, dpr, canvas.width, canvas.height);
    }
    if (state.cells && CELLS) {
      ctx.globalAlpha = 1;
      if (!CELLS.prepared) {
        var sorted = buckets(CELLS.codes, CELLS.missing, CELLS.n, CELLS.categories.length,
                             function (c) { return c; });
        CELLS.prepared = { order: sorted.order, starts: sorted.starts, colors: CELLS.colors.concat([null]) };
      }
      var radius = Math.max(CELLS.diameter / 2, 1.2 / a.k);
      cellsDrawn = drawPoints(CELLS.X, CELLS.Y, CELLS.prepared, radius, false, a, dpr,
                              canvas.width, canvas.height);
    }
    if (state.hover >= 0) {
      var i = state.hover, r = Math.max(S.diameter / 2 * a.k, 3) * dpr;
      ctx.globalAlpha = 1; ctx.lineWidth = 2 * dpr; ctx.strokeStyle = "#000";
      ctx.beginPath(); ctx.arc((a.ox + X[i] * a.k) * dpr, (a.oy + Y[i] * a.k) * dpr, r, 0, 6.2832); ctx.stroke();
    }
    body.dataset.spotsDrawn = String(drawn);
    body.dataset.cellsDrawn = String(cellsDrawn);
    body.dataset.drawMs = String(Math.round(performance.now() - t0));
    return drawn;
  }
  var pending = false;
  function schedule() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(function () { pending = false; draw(); });
  }
  // the first view and the home button frame the spots, not the whole slide
  function fitSpots(immediately) {
    var w = IMG.width, pad = Math.max(S.diameter * 1.5, 0.06 * Math.max(GRID.x1 - GRID.x0, GRID.y1 - GRID.y0));
    if (!(GRID.x1 >= GRID.x0)) { viewer.viewport.goHome(immediately); return; }
    viewer.viewport.fitBounds(new OpenSeadragon.Rect((GRID.x0 - pad) / w, (GRID.y0 - pad) / w,
      (GRID.x1 - GRID.x0 + 2 * pad) / w, (GRID.y1 - GRID.y0 + 2 * pad) / w), immediately);
  }
  viewer.addHandler("open", function () {
    viewer.canvas.appendChild(canvas);
    fitSpots(true);
    draw();
    body.dataset.ready = "1";
    if (location.hash.indexOf("selftest") >= 0) selftest();
  });
  ["animation", "update-viewport", "resize"].forEach(function (name) { viewer.addHandler(name, schedule); });
  // resize in the frame the window changes (OSD's own observer would catch up a frame later)
  window.addEventListener("resize", function () { viewer.forceResize(); schedule(); });

  // ---- panel -----------------------------------------------------------------------------
  var select = document.getElementById("layer");
  var groups = {};
  LAYERS.forEach(function (layer) {
    if (!groups[layer.group]) {
      groups[layer.group] = el("optgroup", { label: layer.group });
      select.appendChild(groups[layer.group]);
    }
    groups[layer.group].appendChild(el("option", { value: String(layer.index) }, layer.name));
  });
  function legend(layer) {
    var box = document.getElementById("legend");
    box.textContent = "";
    box.appendChild(el("h2", {}, layer.name));
    if (layer.unit) box.appendChild(el("div", { "class": "unit" }, layer.unit));
    if (layer.kind === "continuous") {
      var bar = el("canvas", { width: "256", height: "14" }), g = bar.getContext("2d");
      var lut = DATA.luts[layer.scale];
      for (var i = 0; i < 256; i++) { g.fillStyle = lut[Math.floor(i / 256 * lut.length)]; g.fillRect(i, 0, 1, 14); }
      box.appendChild(bar);
      var ticks = el("div", { "class": "ticks" });
      var clipped = layer.vmax < layer.hi;
      [layer.vmin, (layer.vmin + layer.vmax) / 2, layer.vmax].forEach(function (v, j) {
        ticks.appendChild(el("span", {}, (j === 2 && clipped ? "≥ " : "") + fmt(v)));
      });
      box.appendChild(ticks);
      var nan = 0;
      for (var m = 0; m < N; m++) if (layer.codes[m] === MISSING16) nan++;
      if (nan) box.appendChild(el("div", { "class": "unit" }, nan.toLocaleString() + " spots without a value (grey)"));
    } else {
      var list = el("ul");
      layer.categories.forEach(function (name, j) {
        var item = el("li"), sw = el("span", { "class": "swatch" });
        sw.style.background = layer.colors[j];
        item.appendChild(sw);
        item.appendChild(el("span", {}, name));
        item.appendChild(el("span", { "class": "count" }, String(layer.counts[j])));
        list.appendChild(item);
      });
      box.appendChild(list);
    }
    body.dataset.legend = layer.name;
  }
  function show(index) {
    state.layer = LAYERS[index];
    select.value = String(index);
    legend(state.layer);
    body.dataset.layer = state.layer.name;
    schedule();
  }
  select.addEventListener("change", function () { show(Number(select.value)); });
  document.getElementById("opacity").addEventListener("input", function (e) {
    state.opacity = Number(e.target.value); schedule();
  });
  document.getElementById("show-image").addEventListener("change", function (e) {
    var item = viewer.world.getItemAt(0);
    if (item) item.setOpacity(e.target.checked ? 1 : 0);
  });
  if (DATA.blank) document.getElementById("image-toggle").hidden = true;
  if (CELLS) {
    document.getElementById("cells-toggle").hidden = false;
    document.getElementById("show-cells").addEventListener("change", function (e) {
      state.cells = e.target.checked; schedule();
    });
  }
  document.getElementById("zoom-in").onclick = function () { viewer.viewport.zoomBy(1.5); };
  document.getElementById("zoom-out").onclick = function () { viewer.viewport.zoomBy(1 / 1.5); };
  document.getElementById("zoom-home").onclick = function () { fitSpots(false); };

  var qc = document.getElementById("qc");
  DATA.qc.forEach(function (row) {
    var tr = el("tr"); tr.appendChild(el("td", {}, row[0])); tr.appendChild(el("td", {}, row[1])); qc.appendChild(tr);
  });
  var params = document.getElementById("params");
  DATA.params.forEach(function (section) {
    params.appendChild(el("h3", {}, section.title));
    var table = el("table");
    section.rows.forEach(function (row) {
      var tr = el("tr"), v = row[1];
      tr.appendChild(el("td", {}, row[0]));
      tr.appendChild(el("td", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)));
      table.appendChild(tr);
    });
    params.appendChild(table);
  });
  var summary = [N.toLocaleString() + " spots"];
  if (proportionLayers.length) summary.push(proportionLayers.length + " cell types");
  var nGenes = LAYERS.filter(function (l) { return l.gene; }).length;
  if (nGenes) summary.push(nGenes + " predicted genes");
  if (CELLS) summary.push(CELLS.n.toLocaleString() + " placed cells");
  document.getElementById("summary").textContent = summary.join(" · ");

  // ---- hover -----------------------------------------------------------------------------
  var tip = document.getElementById("tooltip");
  function describe(i) {
    var rows = [["spot", S.names[i]]];
    rows.push(["x, y", fmt(X[i] / S.scale + S.origin[0]) + ", " + fmt(Y[i] / S.scale + S.origin[1])]);
    if (dominant && dominant.codes[i] !== dominant.missing) rows.push(["dominant", dominant.categories[dominant.codes[i]]]);
    var html = "<table>" + rows.map(function (r) { return "<tr><td>" + r[0] + "</td><td><b>" + esc(r[1]) + "</b></td></tr>"; }).join("") + "</table>";
    if (proportionLayers.length) {
      var props = proportionLayers.map(function (l) { return [l.name, value(l, i), dominant ? dominant.colors[dominant.categories.indexOf(l.name)] : "#888"]; })
        .filter(function (p) { return p[1] >= 0.01; }).sort(function (a, b) { return b[1] - a[1]; }).slice(0, 6);
      html += props.map(function (p) {
        return "<div><span class='bar' style='width:" + Math.round(p[1] * 80) + "px;background:" + p[2] + "'></span>" + esc(p[0]) + " " + p[1].toFixed(2) + "</div>";
      }).join("");
    }
    qcLayers.forEach(function (l) {
      var v = value(l, i);
      html += "<div>" + esc(l.name) + ": " + (l.kind === "continuous" ? fmt(v) : (v === v ? esc(l.categories[v]) : "n/a")) + "</div>";
    });
    var layer = state.layer;
    if (layer && layer.group !== "proportions" && layer.group !== "QC" && layer !== dominant) {
      var v = value(layer, i), text = layer.kind === "continuous" ? fmt(v) : (v === v ? layer.categories[v] : "n/a");
      if (layer.gene && stdOf[layer.gene]) text += " ± " + fmt(value(stdOf[layer.gene], i));
      html += "<div><b>" + esc(layer.name) + "</b>: " + esc(text) + "</div>";
    }
    return html;
  }
  function esc(s) { return String(s).replace(/[&<>"']/g, function (c) { return "&#" + c.charCodeAt(0) + ";"; }); }
  var viewerElement = document.getElementById("viewer");
  viewerElement.addEventListener("mousemove", function (e) {
    var box = viewerElement.getBoundingClientRect(), a = affine();
    var i = nearest((e.clientX - box.left - a.ox) / a.k, (e.clientY - box.top - a.oy) / a.k);
    if (i !== state.hover) { state.hover = i; schedule(); }
    if (i < 0) { tip.hidden = true; return; }
    tip.innerHTML = describe(i);
    tip.hidden = false;
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
    tip.style.top = Math.min(e.clientY + 14, window.innerHeight - tip.offsetHeight - 4) + "px";
  });
  viewerElement.addEventListener("mouseleave", function () { tip.hidden = true; state.hover = -1; schedule(); });

  // ---- self-test (tests open the file with #selftest) -----------------------------------------
  function selftest() {
    var result = { layers: {}, hover: null, cells: null };
    var keep = state.layer ? state.layer.index : 0;
    LAYERS.forEach(function (layer) { show(layer.index); result.layers[layer.name] = draw(); });
    if (CELLS) { state.cells = true; draw(); result.cells = Number(body.dataset.cellsDrawn); state.cells = false; }
    var first = -1;
    for (var i = 0; i < N && first < 0; i++) if (X[i] === X[i]) first = i;
    result.hover = first >= 0 && nearest(X[first], Y[first]) === first ? describe(first).length : 0;
    show(keep);
    draw();
    body.dataset.selftest = JSON.stringify(result);
  }

  var start = dominant ? dominant.index : 0;
  var m = /layer=([^&]+)/.exec(location.hash);
  if (m) {
    var wanted = decodeURIComponent(m[1]);
    LAYERS.forEach(function (l) { if (l.name === wanted) start = l.index; });
  }
  show(start);
})();
