/* locdiff interactive map (see locdiff/mapview/__init__.py): items -> plotly traces on lon/lat axes over
   the inlined Blue Marble. Great-circle lines (truth -> prediction) and credible circles are computed
   here and split at the antimeridian, so nothing is drawn across the whole map. */
var LocdiffMap = (function () {
  "use strict";
  var EARTH_KM = 6371.0088;
  var D = Math.PI / 180;
  var COLORS = ["#1a9850", "#a6d96a", "#fee08b", "#fc8d59", "#d73027"];
  var state = { div: null, items: [], opts: {} };

  function vec(lat, lon) {
    return [Math.cos(lat * D) * Math.cos(lon * D), Math.cos(lat * D) * Math.sin(lon * D), Math.sin(lat * D)];
  }
  function latlon(v) {
    var n = Math.hypot(v[0], v[1], v[2]);
    return [Math.asin(Math.max(-1, Math.min(1, v[2] / n))) / D, Math.atan2(v[1], v[0]) / D];
  }

  // (lat, lon) points -> x/y arrays for a plotly line, cut where a step crosses the antimeridian:
  // the piece ends on the +-180 edge at the interpolated latitude and the next starts on the other edge.
  function polyline(pts, x, y) {
    for (var i = 0; i < pts.length; i++) {
      if (i > 0) {
        var a = pts[i - 1], b = pts[i], d = b[1] - a[1];
        if (Math.abs(d) > 180) {
          var next = d > 0 ? b[1] - 360 : b[1] + 360;
          var edge = next > a[1] ? 180 : -180;
          var f = (edge - a[1]) / (next - a[1]);
          var le = a[0] + f * (b[0] - a[0]);
          x.push(edge, null, -edge);
          y.push(le, null, le);
        }
      }
      x.push(pts[i][1]);
      y.push(pts[i][0]);
    }
    x.push(null);
    y.push(null);
  }

  // the great-circle arc between two points (slerp), n points
  function greatCircle(lat1, lon1, lat2, lon2, n) {
    var p = vec(lat1, lon1), q = vec(lat2, lon2);
    var dot = Math.max(-1, Math.min(1, p[0] * q[0] + p[1] * q[1] + p[2] * q[2]));
    var w = Math.acos(dot), pts = [];
    if (w < 1e-9) return [[lat1, lon1], [lat2, lon2]];
    if (Math.PI - w < 1e-6) { // antipodal: take the meridian through p
      var z = Math.abs(p[2]) < 0.999 ? [0, 0, 1] : [1, 0, 0];
      var zp = z[0] * p[0] + z[1] * p[1] + z[2] * p[2];
      q = [z[0] - zp * p[0], z[1] - zp * p[1], z[2] - zp * p[2]];
      var qn = Math.hypot(q[0], q[1], q[2]);
      q = [q[0] / qn, q[1] / qn, q[2] / qn];
      for (var j = 0; j < n; j++) {
        var t = (Math.PI * j) / (n - 1);
        pts.push(latlon([0, 1, 2].map(function (k) { return Math.cos(t) * p[k] + Math.sin(t) * q[k]; })));
      }
      return pts;
    }
    for (var i = 0; i < n; i++) {
      var s = i / (n - 1), a = Math.sin((1 - s) * w), b = Math.sin(s * w);
      pts.push(latlon([a * p[0] + b * q[0], a * p[1] + b * q[1], a * p[2] + b * q[2]]));
    }
    return pts;
  }

  // the circle of radius r km around (lat, lon): destination points at every bearing
  function circle(lat, lon, rKm, n) {
    var dl = Math.min(rKm / EARTH_KM, Math.PI), f = lat * D, pts = [];
    for (var i = 0; i <= n; i++) {
      var th = (2 * Math.PI * i) / n;
      var f2 = Math.asin(Math.sin(f) * Math.cos(dl) + Math.cos(f) * Math.sin(dl) * Math.cos(th));
      var l2 = lon * D + Math.atan2(Math.sin(th) * Math.sin(dl) * Math.cos(f),
                                     Math.cos(dl) - Math.sin(f) * Math.sin(f2));
      var lo = ((l2 / D + 540) % 360) - 180;
      pts.push([f2 / D, lo]);
    }
    return pts;
  }

  function bin(err) {
    var th = state.opts.thresholds || [];
    for (var i = 0; i < th.length; i++) if (err < th[i]) return i;
    return th.length;
  }
  function binLabel(i) {
    var th = state.opts.thresholds || [];
    if (i === 0) return "error < " + th[0] + " km";
    if (i === th.length) return "error > " + th[i - 1] + " km";
    return "error " + th[i - 1] + "-" + th[i] + " km";
  }
  function fmt(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
  function km(v) { return v === null || v === undefined ? "-" : Math.round(v).toLocaleString("en") + " km"; }

  function traces(items) {
    var out = [];
    [["r90", "90 % credible circle", "dot"], ["r50", "50 % credible circle", "solid"]].forEach(function (c) {
      var x = [], y = [];
      items.forEach(function (it) { if (it[c[0]]) polyline(circle(it.lat, it.lon, it[c[0]], 96), x, y); });
      if (x.length) out.push({ type: "scatter", mode: "lines", x: x, y: y, name: c[1], uid: c[0],
        hoverinfo: "skip", line: { color: "#7fdbff", width: 1.2, dash: c[2] } });
    });
    var bins = {};
    items.forEach(function (it) {
      if (!it.truth) return;
      var b = bin(it.err), g = bins[b] || (bins[b] = { x: [], y: [] });
      polyline(greatCircle(it.truth[0], it.truth[1], it.lat, it.lon, 64), g.x, g.y);
    });
    Object.keys(bins).sort().forEach(function (b) {
      out.push({ type: "scatter", mode: "lines", x: bins[b].x, y: bins[b].y, name: binLabel(+b), uid: "gc" + b,
        hoverinfo: "skip", line: { color: COLORS[Math.min(+b, COLORS.length - 1)], width: 1.5 } });
    });
    var mx = [], my = [], ms = [], mc = [], mt = [];
    items.forEach(function (it, i) {
      (it.modes || []).forEach(function (m, k) {
        mx.push(m[1]); my.push(m[0]); ms.push(6 + 34 * Math.sqrt(m[2])); mc.push(i);
        mt.push(it.id + " mode " + (k + 1) + ": " + fmt(m[0], 2) + ", " + fmt(m[1], 2) + " (" + fmt(100 * m[2], 0) + " %)");
      });
    });
    if (mx.length) out.push({ type: "scatter", mode: "markers", x: mx, y: my, customdata: mc, text: mt, uid: "modes",
      name: "modes (size ~ mass)", hoverinfo: "text",
      marker: { symbol: "circle-open", size: ms, color: "#ffd400", line: { width: 2 } } });
    var truth = items.map(function (it, i) { return it.truth ? i : -1; }).filter(function (i) { return i >= 0; });
    if (truth.length) out.push({ type: "scatter", mode: "markers", uid: "truth", name: "truth",
      x: truth.map(function (i) { return items[i].truth[1]; }), y: truth.map(function (i) { return items[i].truth[0]; }),
      customdata: truth, hoverinfo: "text",
      text: truth.map(function (i) { return items[i].id + " truth: " + fmt(items[i].truth[0], 2) + ", " + fmt(items[i].truth[1], 2); }),
      marker: { symbol: "circle", size: 7, color: "#ffffff", line: { width: 1, color: "#000" } } });
    if (items.length) out.push({ type: "scatter", mode: "markers", uid: "pred", name: "prediction",
      x: items.map(function (it) { return it.lon; }), y: items.map(function (it) { return it.lat; }),
      customdata: items.map(function (it, i) { return i; }), hoverinfo: "text",
      text: items.map(function (it) {
        return it.id + ": " + fmt(it.lat, 3) + ", " + fmt(it.lon, 3) + (it.truth ? " (error " + km(it.err) + ")" : "");
      }),
      marker: { symbol: "x", size: 11, line: { width: 1 },
        color: items.map(function (it) { return it.truth ? COLORS[Math.min(bin(it.err), COLORS.length - 1)] : "#ff3b30"; }) } });
    return out;
  }

  function layout() {
    return {
      title: { text: state.opts.title || "", font: { color: "#eee", size: 15 } },
      paper_bgcolor: "#111", plot_bgcolor: "#05070d", font: { color: "#ddd" },
      margin: { l: 45, r: 10, t: 40, b: 35 }, dragmode: "pan", hovermode: "closest",
      legend: { bgcolor: "rgba(0,0,0,0.55)", x: 0.005, y: 0.02, xanchor: "left", yanchor: "bottom" },
      xaxis: { range: [-180, 180], constrain: "domain", showgrid: false, zeroline: false, title: { text: "longitude (deg)" } },
      yaxis: { range: [-90, 90], constrain: "domain", showgrid: false, zeroline: false, scaleanchor: "x", title: { text: "latitude (deg)" } },
      images: [{ source: state.opts.basemap, xref: "x", yref: "y", x: -180, y: 90, sizex: 360, sizey: 180,
        sizing: "stretch", layer: "below" }],
      uirevision: "keep",
    };
  }

  function esc(s) {
    return String(s === null || s === undefined ? "" : s).replace(/[&<>"]/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c];
    });
  }

  function popup(i) {
    var it = state.items[i], el = document.getElementById("ld-popup");
    if (!it || !el) return;
    var h = '<button class="ld-close" title="close">&times;</button><b>' + esc(it.id) + "</b>";
    if (it.thumb) h += '<img class="ld-thumb" alt="thumbnail" src="' + esc(it.thumb) + '">';
    h += "<div>prediction: " + fmt(it.lat, 4) + ", " + fmt(it.lon, 4) + "</div>";
    if (it.truth) h += "<div>truth: " + fmt(it.truth[0], 4) + ", " + fmt(it.truth[1], 4) + " (error " + km(it.err) + ")</div>";
    if (it.r50 || it.r90) h += "<div>credible radii: 50 % " + km(it.r50) + ", 90 % " + km(it.r90) + "</div>";
    if ((it.modes || []).length) {
      h += '<table class="ld-modes"><tr><th>mode</th><th>lat</th><th>lon</th><th>mass</th></tr>';
      it.modes.forEach(function (m, k) {
        h += "<tr><td>" + (k + 1) + "</td><td>" + fmt(m[0], 3) + "</td><td>" + fmt(m[1], 3) + "</td><td>" + fmt(100 * m[2], 1) + " %</td></tr>";
      });
      h += "</table>";
    }
    el.innerHTML = h;
    el.hidden = false;
    el.querySelector(".ld-close").onclick = function () { el.hidden = true; };
  }

  function render() {
    return Plotly.react(state.div, traces(state.items), layout(), { scrollZoom: true, displaylogo: false, responsive: true });
  }

  function init(div, items, opts) {
    state.div = div; state.items = items.slice(); state.opts = opts || {};
    return render().then(function () {
      div.on("plotly_click", function (ev) {
        var p = ev && ev.points && ev.points[0];
        if (p && p.customdata !== undefined) popup(p.customdata);
      });
    });
  }

  function add(items) {
    Array.prototype.push.apply(state.items, items);
    return render();
  }

  return { init: init, add: add, popup: popup, greatCircle: greatCircle, circle: circle, polyline: polyline,
    items: function () { return state.items; } };
})();
