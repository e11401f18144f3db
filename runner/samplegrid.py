"""The sample grid's drawing: images in rows and columns under labelled headers, each row labelled with its
prompt.

Owns: `make_grid` (the layout, the "LoRA · step N" header, prompts wrapped at words and cut with "…"
when they do not fit their row) and the grid's sizes.

Must not: run any model (runner.sample does), touch storage, or import torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

LABEL_H_PX = 16  # height of the "base" / "LoRA" header row
PROMPT_W_PX = 160  # width of the column that labels each row with its prompt
LINE_H_PX = 11  # one line of PIL's default font, with its spacing
HEADERS = ("base", "LoRA")


def make_grid(
    rows: Sequence[Sequence[Image.Image]], headers: Sequence[str], prompts: Sequence[str] | None = None, *,
    step: int | None = None,
) -> Image.Image:  # fmt: skip
    """Images in a grid (rows × columns) under a header row of labels; with `prompts`, a column on the left
    labels each row with its prompt (wrapped, cut with "…" when it does not fit the row). `step` is named
    in the last column's header ("LoRA · step 120"), or in the corner above the prompts when that column
    is too narrow for it."""
    width, height = rows[0][0].size
    left = PROMPT_W_PX if prompts else 0
    grid = Image.new("RGB", (left + width * len(headers), LABEL_H_PX + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    headers, corner = list(headers), "prompt"
    if step is not None:
        with_step = f"{headers[-1]} · step {step}"
        if draw.textlength(with_step) <= width - 8 or not prompts:
            headers[-1] = with_step
        else:
            corner = f"prompt · LoRA at step {step}"
    if prompts:
        draw.text((4, 2), _fit(draw, corner, PROMPT_W_PX - 8, 1)[0], fill="black")
    for col, label in enumerate(headers):
        draw.text((left + col * width + 4, 2), _fit(draw, label, width - 8, 1)[0], fill="black")
    for r, images in enumerate(rows):
        top = LABEL_H_PX + r * height
        if prompts:
            lines = _fit(draw, prompts[r], PROMPT_W_PX - 8, max(1, (height - 4) // LINE_H_PX))
            draw.multiline_text((4, top + 2), "\n".join(lines), fill="black", spacing=LINE_H_PX - _line_px(draw))
        for col, image in enumerate(images):
            grid.paste(image.convert("RGB"), (left + col * width, top))
    return grid


def _line_px(draw: ImageDraw.ImageDraw) -> int:
    box = draw.textbbox((0, 0), "Ag")
    return min(LINE_H_PX, box[3] - box[1])


def _fit(draw: ImageDraw.ImageDraw, text: str, width_px: int, max_lines: int) -> list[str]:
    """`text` wrapped at words into lines of at most `width_px`; at most `max_lines`, the last cut with "…"."""
    lines: list[str] = []
    for word in text.split():
        while draw.textlength(word) > width_px and len(word) > 1:  # a word longer than a line: split it
            cut = max(1, int(len(word) * width_px / draw.textlength(word)))
            lines, word = _add(draw, lines, word[:cut], width_px), word[cut:]
        lines = _add(draw, lines, word, width_px)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "…") > width_px:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last.rstrip() + "…"]
    return lines or [""]


def _add(draw: ImageDraw.ImageDraw, lines: list[str], word: str, width_px: int) -> list[str]:
    if lines and draw.textlength(f"{lines[-1]} {word}") <= width_px:
        return [*lines[:-1], f"{lines[-1]} {word}"]
    return [*lines, word]
