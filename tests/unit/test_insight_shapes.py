"""The labelled library of traffic shapes (examples/shapes/*.yaml): every
shape reads as its label with the agent up 30 s, 2 min and 1 h, from
synthesized sampler intervals. The table printed is the confusion table of
shape against reading."""

from __future__ import annotations

from pathlib import Path

from tidegate.observation.shapes import confusion_table, load_library, run_library

SHAPES = Path(__file__).resolve().parents[2] / "examples" / "shapes"


def test_every_shape_in_the_library_reads_right_at_every_age(capsys):
    from tidegate.observation.shapes import confusion_table, load_library, run_library

    shapes = load_library(SHAPES)
    assert len(shapes) >= 14
    res = run_library(shapes)
    table = confusion_table(res)
    print(table)
    wrong = [f"{r['shape']} @ {r['age']:g}s: {r['reading']}" for r in res if r["verdict"] != r["expect"]]
    assert not wrong, "\n".join(wrong)
    assert f"{len(res)} of {len(res)} readings right" in table
