"""Regenerate the sample dataset: eight geometry problems with figures drawn by PIL.

    python -m pr1_jax.data.sample.generate [OUT_DIR]

writes OUT_DIR/images/*.png, OUT_DIR/sample.jsonl (image paths, annotation lists) and
OUT_DIR/sample.parquet (the paper's layout: "<image>" placeholder in `problem`, image bytes in
`images`, `<infoN>`-tagged `visual_key_info`). Default OUT_DIR: this package directory.
Needs pyarrow for the parquet file.
"""

from __future__ import annotations

import os
import sys

from PIL import Image, ImageDraw, ImageFont

from pr1_jax.data.records import ImageRef, Record, write_jsonl, write_parquet

INK = (20, 20, 20)
BLUE = (30, 70, 200)


def _canvas(w, h):
    img = Image.new("RGB", (w, h), (255, 255, 255))
    return img, ImageDraw.Draw(img), ImageFont.load_default(size=18)


def _label(d, xy, text, font, fill=INK):
    d.text(xy, text, fill=fill, font=font, anchor="mm")


def right_triangle():
    img, d, f = _canvas(320, 240)
    A, C, B = (60, 40), (60, 200), (280, 200)
    d.polygon([A, C, B], outline=INK, width=3)
    d.rectangle([60, 180, 80, 200], outline=INK, width=2)
    for p, t in ((A, "A"), (B, "B"), (C, "C")):
        _label(d, (p[0] + (-18 if p[0] < 100 else 16), p[1] + (-8 if p[1] < 100 else 14)), t, f)
    _label(d, (40, 120), "3", f, BLUE)
    _label(d, (170, 220), "4", f, BLUE)
    return img, Record("sample/right-triangle", "In right triangle ABC, find the length of AB.", "5",
                       annotations=("Triangle ABC has a right angle at C.", "AC = 3.", "BC = 4."))


def circle_radius():
    img, d, f = _canvas(300, 300)
    O, r = (150, 150), 110
    d.ellipse([O[0] - r, O[1] - r, O[0] + r, O[1] + r], outline=INK, width=3)
    A = (O[0] + r, O[1])
    d.line([O, A], fill=INK, width=3)
    d.ellipse([O[0] - 4, O[1] - 4, O[0] + 4, O[1] + 4], fill=INK)
    _label(d, (O[0] - 14, O[1] + 14), "O", f)
    _label(d, (A[0] + 14, A[1]), "A", f)
    _label(d, (205, 136), "7", f, BLUE)
    return img, Record("sample/circle-radius", "Find the diameter of circle O.", "14",
                       annotations=("O is the center of the circle.", "A lies on the circle.", "OA = 7."))


def rectangle_diagonal():
    img, d, f = _canvas(400, 250)
    A, B, C, D = (60, 40), (340, 40), (340, 210), (60, 210)
    d.polygon([A, B, C, D], outline=INK, width=3)
    d.line([A, C], fill=INK, width=2)
    for p, t, dx, dy in ((A, "A", -16, -10), (B, "B", 16, -10), (C, "C", 16, 12), (D, "D", -16, 12)):
        _label(d, (p[0] + dx, p[1] + dy), t, f)
    _label(d, (200, 24), "8", f, BLUE)
    _label(d, (362, 125), "6", f, BLUE)
    return img, Record("sample/rectangle-diagonal", "ABCD is a rectangle. Find the length of the diagonal AC.",
                       "10", annotations=("ABCD is a rectangle.", "AB = 8.", "BC = 6.", "AC is a diagonal."))


def isosceles_base_angle():
    img, d, f = _canvas(260, 340)
    A, B, C = (130, 40), (40, 300), (220, 300)
    d.polygon([A, B, C], outline=INK, width=3)
    for p, q in ((A, B), (A, C)):  # equal-side ticks
        mx, my = (p[0] + q[0]) / 2, (p[1] + q[1]) / 2
        d.line([(mx - 8, my - 3), (mx + 8, my + 3)], fill=INK, width=2)
    _label(d, (130, 22), "A", f)
    _label(d, (26, 314), "B", f)
    _label(d, (234, 314), "C", f)
    _label(d, (130, 105), "40°", f, BLUE)
    return img, Record("sample/isosceles-base-angle", "Find the measure of angle B in degrees.", "70",
                       annotations=("AB = AC.", "angle BAC = 40.", "Triangle ABC is isosceles."))


def parallel_lines():
    img, d, f = _canvas(500, 200)
    d.line([(20, 60), (480, 60)], fill=INK, width=3)
    d.line([(20, 150), (480, 150)], fill=INK, width=3)
    d.line([(170, 10), (254, 190)], fill=INK, width=3)  # meets l at 65 degrees
    _label(d, (470, 44), "l", f)
    _label(d, (470, 134), "m", f)
    _label(d, (228, 78), "65°", f, BLUE)
    _label(d, (268, 132), "x°", f, BLUE)
    return img, Record("sample/parallel-lines", "Lines l and m are parallel. Find x.", "115",
                       annotations=("Line l is parallel to line m.", "A transversal crosses l and m.",
                                    "The marked angle at line l is 65 degrees.",
                                    "x and the 65 degree angle are same-side interior angles."))


def square_perimeter():
    img, d, f = _canvas(240, 240)
    d.rectangle([50, 50, 190, 190], outline=INK, width=3)
    for x, y in ((120, 50), (120, 190)):
        d.line([(x, y - 7), (x, y + 7)], fill=INK, width=2)
    for x, y in ((50, 120), (190, 120)):
        d.line([(x - 7, y), (x + 7, y)], fill=INK, width=2)
    _label(d, (120, 32), "9", f, BLUE)
    for p, t in (((36, 36), "P"), ((204, 36), "Q"), ((204, 204), "R"), ((36, 204), "S")):
        _label(d, p, t, f)
    return img, Record("sample/square-perimeter", "PQRS is a square. Find its perimeter.", "36",
                       annotations=("PQRS is a square.", "PQ = 9."))


def triangle_angles():
    img, d, f = _canvas(360, 280)
    A, B, C = (40, 240), (320, 240), (140, 40)
    d.polygon([A, B, C], outline=INK, width=3)
    _label(d, (28, 256), "A", f)
    _label(d, (332, 256), "B", f)
    _label(d, (140, 22), "C", f)
    _label(d, (92, 222), "55°", f, BLUE)
    _label(d, (280, 222), "75°", f, BLUE)
    _label(d, (148, 80), "y°", f, BLUE)
    return img, Record("sample/triangle-angles", "Find y.", "50",
                       annotations=("angle CAB = 55.", "angle ABC = 75.", "angle ACB = y."))


def trapezoid_area():
    img, d, f = _canvas(448, 336)
    A, B, C, D = (40, 280), (410, 280), (300, 80), (150, 80)
    d.polygon([A, B, C, D], outline=INK, width=3)
    d.line([(150, 80), (150, 280)], fill=INK, width=2)
    d.rectangle([150, 262, 168, 280], outline=INK, width=2)
    _label(d, (225, 62), "4", f, BLUE)
    _label(d, (225, 302), "10", f, BLUE)
    _label(d, (136, 180), "5", f, BLUE)
    return img, Record("sample/trapezoid-area", "Find the area of the trapezoid.", "35",
                       annotations=("The top base is 4.", "The bottom base is 10.", "The height is 5.",
                                    "The two bases are parallel."))


MAKERS = (right_triangle, circle_radius, rectangle_diagonal, isosceles_base_angle, parallel_lines,
          square_perimeter, triangle_angles, trapezoid_area)


def main(out_dir: str | None = None) -> None:
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for make in MAKERS:
        img, r = make()
        path = os.path.join(out_dir, "images", r.id.split("/")[-1] + ".png")
        img.save(path, optimize=True)
        records.append(Record(r.id, r.problem, r.answer, (ImageRef(path=path),), r.annotations))
    write_jsonl(records, os.path.join(out_dir, "sample.jsonl"))
    write_parquet(records, os.path.join(out_dir, "sample.parquet"))
    print(f"wrote {len(records)} records to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
