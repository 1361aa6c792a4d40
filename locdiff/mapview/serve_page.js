/* locdiff serve's page: photos dropped or chosen are POSTed one by one to predict (this server's
   POST /predict, the raw image as the body) and drawn on the map with their modes and circles. */
(function () {
  "use strict";
  var drop = document.getElementById("ld-drop"), input = document.getElementById("ld-files");
  var status = document.getElementById("ld-status"), done = 0, failed = [];

  function show() {
    status.textContent = done + " predicted" + (failed.length ? "; failed: " + failed.join("; ") : "");
  }

  function send(file) {
    return fetch("predict", { method: "POST", body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" } })
      .then(function (r) {
        return r.json().then(function (j) {
          if (!r.ok) throw new Error(j.detail || r.statusText);
          return j.predictions[0];
        });
      })
      .then(function (p) {
        done += 1;
        return LocdiffMap.add([{ id: file.name, path: file.name, lat: p.lat, lon: p.lon,
          modes: (p.modes || []).map(function (m) { return [m.lat, m.lon, m.mass]; }),
          r50: p.radius50_km, r90: p.radius90_km, truth: null, err: null, thumb: URL.createObjectURL(file) }]);
      })
      .catch(function (e) { failed.push(file.name + ": " + e.message); })
      .then(show);
  }

  function handle(files) {
    status.textContent = "predicting " + files.length + " photo(s)...";
    Array.prototype.reduce.call(files, function (chain, f) {
      return chain.then(function () { return send(f); });
    }, Promise.resolve());
  }

  input.addEventListener("change", function () { handle(input.files); });
  ["dragenter", "dragover"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add("ld-over"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.remove("ld-over"); });
  });
  drop.addEventListener("drop", function (e) { handle(e.dataTransfer.files); });
})();
