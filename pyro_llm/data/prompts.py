"""The papers' multiple-choice prompt: question, lettered choices, ``Answer:``.

The model's answer is read from the next-token logits of the letter tokens ``" A"``, ``" B"``...
at the last prompt position (BLoB and Laplace-LoRA's protocol, ``algorithms.md`` section 3).
"""

from __future__ import annotations

from typing import Sequence

from .examples import LETTERS

__all__ = ["format_multiple_choice", "answer_strings"]


def format_multiple_choice(question: str, choices: Sequence[str], context: str | None = None) -> str:
    """``[context]\\nQuestion: q\\nChoices:\\nA. c0\\nB. c1 ...\\nAnswer:``."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    lines = []
    if context:
        lines.append(context.strip())
    lines.append(f"Question: {question.strip()}")
    lines.append("Choices:")
    lines.extend(f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices))
    lines.append("Answer:")
    return "\n".join(lines)


def answer_strings(num_classes: int) -> list[str]:
    """The continuation strings whose first tokens are the class logits: ``" A"``, ``" B"``..."""
    return [f" {LETTERS[i]}" for i in range(num_classes)]
