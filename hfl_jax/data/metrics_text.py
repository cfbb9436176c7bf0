"""Answer extractors and exact-match scoring for generated text (host-side, pure Python).

GSM8K (Cobbe et al., 2021) is scored by exact match of the final number: the reference is the
number after the answer's last ``####`` line, commas removed; a generated response's answer is the
number after its first ``####`` when it writes one (a model fine-tuned on GSM8K answers does), else
the last number it writes (lm-evaluation-harness's "strict" and "flexible" extractions, in one).
Numbers are compared as normalized strings (:func:`normalize_number`), not as floats.

`EXTRACTORS` maps a name (``gsm8k``, ``label_word``, ``exact``) to a ``(generated_text,
reference_text) -> bool`` function, for an evaluation loop that decodes generations and counts hits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from hfl_jax.data.tasks import DataError

# A number: thousands groups with commas (1,234,567) or plain digits, an optional fraction; a
# minus sign only when not glued to a preceding digit or letter ("3-5" is 3 and 5, not 3 and -5).
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\.?|(?<![\w.])-?\.\d+")


def normalize_number(s: str) -> str:
    """A number string in a canonical form: commas and surrounding spaces removed, a trailing
    ``.`` dropped, trailing zeros of a fraction dropped (``72.0`` -> ``72``, ``2.50`` -> ``2.5``),
    a leading ``+`` and a negative zero's sign dropped."""
    s = s.strip().replace(",", "").lstrip("+").rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s.startswith("-.") or s.startswith("."):
        s = s.replace(".", "0.", 1)
    if s.lstrip("-").strip("0.") == "" and s:
        s = "0"
    return s


def last_number(text: str) -> str | None:
    """The last number in ``text``, normalized (:func:`normalize_number`), or None when it has none.

    ``"so she has 1,234.0 apples."`` -> ``"1234"``; ``"from 3 to 5"`` -> ``"5"``."""
    found = _NUMBER_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def gsm8k_reference(answer: str) -> str:
    """The reference final answer of a GSM8K worked solution: the number after its last ``####``,
    normalized (``"... \\n#### 1,234"`` -> ``"1234"``). Raises `DataError` when there is no ``####``."""
    if "####" not in answer:
        raise DataError(f"GSM8K answer has no '####' final-answer line: {answer[-80:]!r}")
    tail = answer.rsplit("####", 1)[1].strip()
    found = _NUMBER_RE.findall(tail)
    return normalize_number(found[0]) if found else normalize_number(tail)


def gsm8k_prediction(generated: str) -> str | None:
    """The final answer a generated GSM8K response gives: the first number after its first
    ``####`` (text a model generates past its answer is ignored), else its last number, else None."""
    if "####" in generated:
        found = _NUMBER_RE.findall(generated.split("####", 1)[1])
        if found:
            return normalize_number(found[0])
    return last_number(generated)


def exact_match(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Fraction of positions where ``predictions[i].strip() == references[i].strip()`` (a None
    prediction, such as :func:`last_number` of a text without numbers, never matches).

    Raises `DataError` when the lengths differ or are 0."""
    if len(predictions) != len(references):
        raise DataError(f"exact_match: {len(predictions)} predictions but {len(references)} references")
    if not references:
        raise DataError("exact_match: no predictions to score")
    hits = sum(p is not None and str(p).strip() == str(r).strip() for p, r in zip(predictions, references))
    return hits / len(references)


def match_gsm8k(generated: str, reference: str) -> bool:
    """Whether a generated GSM8K response's final number (:func:`gsm8k_prediction`) equals the
    reference's; ``reference`` is a whole worked solution (with ``####``) or the bare number."""
    ref = gsm8k_reference(reference) if "####" in reference else normalize_number(reference)
    return gsm8k_prediction(generated) == ref


def match_label_word(generated: str, reference: str) -> bool:
    """Whether a generated text starts with the label word ``reference`` (case-insensitive, leading
    spaces ignored) followed by a non-word character or the end: ``"Positive."`` matches
    ``positive``, ``"positively"`` does not."""
    g, r = generated.strip().lower(), reference.strip().lower()
    return bool(r) and g.startswith(r) and (len(g) == len(r) or not (g[len(r)].isalnum() or g[len(r)] == "_"))


def match_exact(generated: str, reference: str) -> bool:
    """Whether the generated text equals the reference, surrounding whitespace ignored."""
    return generated.strip() == reference.strip()


EXTRACTORS: Mapping[str, Callable[[str, str], bool]] = {
    "gsm8k": match_gsm8k,
    "label_word": match_label_word,
    "exact": match_exact,
}
