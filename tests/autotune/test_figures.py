"""Figures of a report: candidates' labels stay readable, latency names its machine."""

from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Annotation

from autotune.figures import candidates_figure, predicted_measured_figure
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
    assert [t.xyann for t in texts] == [(4, 2), (-4, 2)]  # the right-most one turns left


def _boxes_and_frame(plan: Plan) -> tuple[list, object]:
    figure = candidates_figure(plan)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # positions as drawn into the PNG
    renderer = canvas.get_renderer()
    texts = [t for t in figure.axes[0].texts if isinstance(t, Annotation)]
    boxes = [t.get_window_extent(renderer) for t in texts]
    return boxes, figure.axes[0].get_window_extent(renderer)


def _assert_apart(boxes: list) -> None:
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)


NAMES = ["allocator"] + [f"uniform int{b}-g{g}-asym" for b in (2, 3, 4) for g in (32, 64, 128)]


def test_labels_of_near_equal_candidates_do_not_overlap_when_drawn() -> None:
    candidates = [
        {"name": name, "bytes": 5_000_000 + 500 * i, "screening_error": 0.01 * (1 + 0.001 * i)}
        for i, name in enumerate(NAMES)
    ]
    candidates.append({"name": "uniform int8-ch-sym", "bytes": 9_000_000, "screening_error": 1e-5})
    boxes, _ = _boxes_and_frame(_plan(candidates))
    assert len(boxes) == len(NAMES) + 1
    _assert_apart(boxes)


def test_a_stack_of_labels_at_the_lowest_point_stays_inside_the_axes() -> None:
    candidates = [{"name": n, "bytes": 5_000_000, "screening_error": 1e-4} for n in NAMES[:6]]
    candidates.append({"name": "uniform int2-g32-sym", "bytes": 2_000_000, "screening_error": 0.5})
    boxes, frame = _boxes_and_frame(_plan(candidates))
    _assert_apart(boxes)
    for box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_the_chosen_plan_keeps_its_label_beside_its_point() -> None:
    names = ["uniform int4-g32-sym", "uniform int4-g32-asym", "allocator"]
    candidates = [{"name": n, "bytes": 5_000_000, "screening_error": 0.01} for n in names]
    figure = candidates_figure(_plan(candidates))
    offsets = {t.get_text(): t.xyann for t in figure.axes[0].texts}
    assert offsets["allocator"][1] == 2
    assert offsets["int4-g32-sym"][1] != 2 and offsets["int4-g32-asym"][1] != 2


def _plan_measured_on(target: dict, device: str) -> Plan:
    return Plan(
        layers={"_default": {"method": "none"}},
        target=target,
        budget={"memory_bytes": 10**7},
        predicted={"bytes": 10**6, "latency_shape": [1, 128]},
        measured={
            "bytes": 10**6,
            "latency_p50_ms": 21.9,
            "latency_p90_ms": 22.5,
            "device": device,
            "baseline": {"latency_p50_ms": 15.9},
        },
    )


@pytest.mark.parametrize(
    ("target", "named"),
    [({"name": "a100-80gb", "kind": "gpu"}, True), ({"name": "local", "kind": "cpu"}, False)],
)
def test_the_latency_panel_names_this_machine_when_the_target_is_another(target, named) -> None:
    figure = predicted_measured_figure(_plan_measured_on(target, "cpu: some cpu, 2 threads"))
    latency = figure.axes[1]
    ticks = [t.get_text() for t in latency.get_xticklabels()]
    measured = [t for t in ticks if t.startswith(("measured", "uncompressed"))]
    assert len(measured) == 3
    assert all(("(this cpu)" in t) == named for t in measured)
    assert ("measured on this cpu" in latency.get_title()) == named
