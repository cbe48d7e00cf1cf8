"""Figures of a report: labels of candidates of equal size stay readable."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Annotation

from autotune.figures import candidates_figure
from autotune.plan import Plan


def _plan(candidates: list[dict]) -> Plan:
    return Plan(
        layers={"_default": {"method": "none"}},
        target={"name": "cpu"},
        budget={"memory_bytes": 10**7},
        predicted={"bytes": 10**6},
        search={"chosen": "allocator", "candidates": candidates},
    )


def _label_boxes(figure) -> list:
    renderer = FigureCanvasAgg(figure).get_renderer()
    texts = [t for t in figure.axes[0].texts if isinstance(t, Annotation)]
    return [t.get_window_extent(renderer) for t in texts]


def test_labels_of_candidates_at_the_same_point_do_not_overlap() -> None:
    same = {"bytes": 5_000_000, "screening_error": 0.01}
    names = ["allocator", "uniform int4-g32-sym", "uniform int4-g32-asym", "uniform int8-ch"]
    figure = candidates_figure(_plan([{"name": n, **same} for n in names]))
    boxes = _label_boxes(figure)
    assert len(boxes) == len(names)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)


def test_labels_of_distant_candidates_stay_beside_their_points() -> None:
    candidates = [
        {"name": "allocator", "bytes": 1_000_000, "screening_error": 0.001},
        {"name": "uniform int4-g32-sym", "bytes": 9_000_000, "screening_error": 0.1},
    ]
    figure = candidates_figure(_plan(candidates))
    texts = [t for t in figure.axes[0].texts if isinstance(t, Annotation)]
    assert [t.xyann for t in texts] == [(4, 2), (4, 2)]
