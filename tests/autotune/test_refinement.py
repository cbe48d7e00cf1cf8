"""Where end-to-end measurements can change the allocator's decision."""

from __future__ import annotations

from autotune.refinement import Reach, anchors, front, near_choice, next_to_measure
from methods.gptq import GPTQOption
from methods.rtn import QuantOption

A, B, C, D, E = (QuantOption(bits, None, True) for bits in (2, 3, 4, 5, 8))
SIZES = {A.label: 100, B.label: 200, C.label: 300, D.label: 400, E.label: 500}


def test_the_front_drops_options_a_cheaper_one_beats() -> None:
    errors = {A.label: 9.0, B.label: 10.0, C.label: 4.0, D.label: 4.0, E.label: 1.0}
    assert front([A, B, C, D, E], SIZES, errors) == [A, C, E]


def test_anchors_are_the_choice_and_each_methods_option_nearest_in_bytes() -> None:
    g3, g5 = GPTQOption(3, None, True), GPTQOption(5, None, True)
    sizes = {**SIZES, g3.label: 200, g5.label: 400}
    estimates = {o.label: 1.0 for o in (A, B, C, D, E, g3, g5)}
    picked = anchors([A, B, C, D, E, g3, g5], sizes, estimates, C.label)
    assert picked[0] == C
    assert {o.method for o in picked} == {"rtn", "gptq"}
    assert len(picked) == 2  # the choice is RTN's own nearest option
    assert picked[1] in (g3, g5)


def test_near_the_choice_are_its_front_neighbours_and_options_an_error_band_could_lift() -> None:
    # B's estimate is 15% above the front at its bytes: a 0.8 band can put it on the front;
    # D's is twice the front's: no band below 0.5 would
    errors = {A.label: 8.0, B.label: 9.2, C.label: 4.0, D.label: 8.0, E.label: 1.0}
    reach = Reach(steps=1, band=0.8)
    near = near_choice([A, B, C, D, E], SIZES, errors, C.label, reach)
    assert near[0] == C
    assert set(near) == {A, B, C, E}
    assert D not in near_choice([A, B, C, D, E], SIZES, errors, C.label, Reach(band=0.5))
    assert B not in near_choice([A, B, C, D, E], SIZES, errors, C.label, Reach(band=0.95))


def test_only_the_steps_byte_range_is_searched() -> None:
    errors = {A.label: 8.0, B.label: 6.0, C.label: 4.0, D.label: 2.0, E.label: 1.0}
    near = near_choice([A, B, C, D, E], SIZES, errors, A.label, Reach(steps=1))
    assert set(near) == {A, B}
    near = near_choice([A, B, C, D, E], SIZES, errors, A.label, Reach(steps=2))
    assert set(near) == {A, B, C}


def test_next_to_measure_leaves_out_what_was_measured_or_refused() -> None:
    errors = {A.label: 8.0, B.label: 6.0, C.label: 4.0, D.label: 2.0, E.label: 1.0}
    options = {"x": [A, B, C, D, E], "y": [A, B, C, D, E]}
    sizes = {"x": SIZES, "y": SIZES}
    chosen = {"x": C.label, "y": E.label}
    tried = {"x": {B.label, C.label, D.label}, "y": {D.label}}
    pending = next_to_measure(options, sizes, {"x": errors, "y": errors}, tried, chosen, Reach())
    assert pending == {"y": [E]}
    tried["y"].add(E.label)
    assert next_to_measure(options, sizes, {"x": errors, "y": errors}, tried, chosen, Reach()) == {}
