"""The report's map draws the date-line crossing wrapped (great-circle arcs), and the printed table
shows GeoScore."""

from __future__ import annotations

import numpy as np

from locdiff import report as rp


def test_dateline_crossing_is_wrapped_not_drawn_across_the_map():
    pieces = rp.great_circle_segments(170.0, 10.0, -170.0, -5.0)
    assert len(pieces) == 2
    for lons, _ in pieces:
        assert np.all(np.abs(np.diff(lons)) < 10)  # no jump across the map
    (l1, a1), (l2, a2) = pieces
    assert l1[0] == 170.0 and l1[-1] == 180.0 and l2[0] == -180.0 and np.isclose(l2[-1], -170.0)
    assert np.isclose(a1[-1], a2[0])  # the two pieces meet at the edge
    # a pair on the same side: one piece, endpoints kept
    (only,) = rp.great_circle_segments(-10.0, 40.0, 20.0, 45.0)
    assert np.isclose(only[0][0], -10) and np.isclose(only[0][-1], 20)
    # antipodes do not crash and stay on the map
    assert all(np.all(np.abs(lo) <= 180) for lo, _ in rp.great_circle_segments(0.0, 0.0, 180.0, 0.0))


def test_world_map_png_with_dateline_pairs_renders():
    png = rp.world_map_png(
        np.array([10.0, 0.0]), np.array([170.0, -179.0]), np.array([-5.0, 1.0]), np.array([-170.0, 179.0])
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_table_prints_geoscore():
    rows = rp.metrics_rows(
        "demo", {"locdiff": {"acc_25km": 0.1, "median_km": 300.0, "geoscore": 3210.4, "n": 5}}
    )
    table = rp.text_table(rows)
    assert "geoscore" in table.splitlines()[0]
    assert "3,210.4" in table
