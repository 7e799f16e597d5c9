"""A CheXpert-style report labeler on medspaCy: mentions from a vocabulary, ConText for negation and doubt.

Structure of the CheXpert labeler (Irvin et al., 2019): find each observation's mentions,
judge each as positive, uncertain or negative in its sentence, then aggregate per report
(positive over uncertain over negative over not mentioned; "No Finding" when no pathology
but support devices is positive or uncertain). The judging is medspaCy's ConText
(Harkema et al., 2009; Chapman's NegEx lineage), the maintained implementation of
modifier scope: a modifier reaches the targets in its direction up to the sentence's end
or a terminating phrase, and the longest of overlapping phrases wins, so "no change in"
is not "no" and "cannot be excluded" is not "not". The hand-written windows this replaces
missed negation over lists, across clauses and in follow-up language (measured on the IU
X-ray reports: ``benchmarks/bench_labeler.py``).

Every phrase lives in ``vocabulary.yaml`` beside this file: mentions, the normal
statements that imply a negative ("heart size is normal"), phrases to ignore, and the
ConText modifiers.

Choices, measured on this machine with the IU development half (1,976 reports):
- Sentences: split after ".", "!" or "?" as spaCy's rule ``sentencizer`` does (a vectorised
  version of it, ``_register_sentences``), rather than medspaCy's PyRuSH, which ran ~8x
  slower here (~100 reports/s) and would miss the 1,000 reports/s goal; report sentences
  end in periods.
- spaCy's blank English tokenizer: nothing to download, as the CheXpert labeler's Java
  stack and CheXbert's weights would need.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from cxr_pipeline.labels import LABELS, no_finding

VOCABULARY = Path(__file__).with_name("vocabulary.yaml")
# A target's category may name several observations ("Pleural Effusion|Pneumothorax" for
# hydropneumothorax): spaCy entities cannot overlap, so one span carries both.
SEPARATOR = "|"
IGNORE = "IGNORE"  # the category of ``ignore`` phrases: matched so that they shadow the mentions inside them
_CONTEXT_CATEGORIES = {"negated": "NEGATED_EXISTENCE", "uncertain": "POSSIBLE_EXISTENCE"}


def vocabulary() -> dict:
    import yaml

    return yaml.safe_load(VOCABULARY.read_text())


def labeler_version() -> str:
    """``medspacy-context/<sha256 of the vocabulary, 12 hex>``: recorded with every CE figure (MLflow)."""
    return "medspacy-context/" + hashlib.sha256(VOCABULARY.read_bytes()).hexdigest()[:12]


def _rule_args(phrase: str | list) -> dict:
    """A vocabulary entry -> TargetRule/ConTextRule keyword arguments (a phrase, or a token pattern)."""
    if isinstance(phrase, str):
        return {"literal": phrase}
    return {"literal": " ".join(str(t.get("LOWER", t.get("TEXT", "*"))) for t in phrase), "pattern": phrase}


SENTENCES = "cxr_sentence_ends"
_ENDS = (".", "!", "?")


def _register_sentences() -> None:
    """A sentence splitter as one vectorised array write, registered with spaCy as a component.

    It splits where spaCy's rule ``sentencizer`` does (after ".", "!" or "?"), but the
    sentencizer visits every token as a Python object and took a fifth of the labeler's time
    (1.2 of 6.5 s for 1,962 IU reports); this sets all boundaries with ``Doc.from_array``.
    """
    import numpy as np
    from spacy.attrs import ORTH, SENT_START
    from spacy.language import Language

    if Language.has_factory(SENTENCES):
        return

    @Language.component(SENTENCES)
    def sentence_ends(doc):
        if len(doc) == 0:
            return doc
        ends = np.isin(doc.to_array(ORTH), [doc.vocab.strings.add(p) for p in _ENDS])
        starts = np.full(len(doc), -1, dtype=np.int32)  # -1: not a start, 1: a start
        starts[0] = 1
        starts[1:][ends[:-1] & ~ends[1:]] = 1
        doc.from_array([SENT_START], starts.astype(np.uint64).reshape(-1, 1))
        return doc


@functools.cache
def pipeline():
    """The spaCy pipeline: blank English, rule sentencizer, medspaCy TargetMatcher and ConText."""
    import spacy
    from medspacy.context import ConTextRule
    from medspacy.target_matcher import TargetRule

    vocab = vocabulary()
    _register_sentences()
    nlp = spacy.blank("en")
    nlp.add_pipe(SENTENCES)
    targets = []
    for label, entry in vocab["observations"].items():
        unknown = set(label.split(SEPARATOR)) - set(LABELS)
        if unknown:
            raise ValueError(f"{VOCABULARY}: observations.{label}: not a CheXpert label: {sorted(unknown)}")
        for kind in ("mentions", "normal"):
            for phrase in entry.get(kind, []):
                targets.append(TargetRule(category=label, metadata={"normal": kind == "normal"}, **_rule_args(phrase)))
    targets += [TargetRule(category=IGNORE, metadata={"normal": False}, **_rule_args(p)) for p in vocab.get("ignore", [])]
    nlp.add_pipe("medspacy_target_matcher").add(targets)
    ctx = vocab["context"]
    list_break = _list_break(ctx["list_break_words"])
    rules = []
    for key, category in _CONTEXT_CATEGORIES.items():
        for direction in ("forward", "backward", "bidirectional"):
            check = list_break if (key, direction) == ("negated", "forward") else None
            for phrase in ctx[key].get(direction, []):
                rules.append(ConTextRule(category=category, direction=direction.upper(), on_modifies=check, **_rule_args(phrase)))
    rules += [ConTextRule(category="PSEUDO", direction="PSEUDO", **_rule_args(p)) for p in ctx["pseudo"]]
    rules += [ConTextRule(category="TERMINATE", direction="TERMINATE", **_rule_args(p)) for p in ctx["terminate"]]
    nlp.add_pipe("medspacy_context", config={"rules": None}).add(rules)
    return nlp


def _list_break(words: list[str]):
    """ConText ``on_modifies`` for forward negations: not across ", <word>" unless the list goes on.

    A comma then a size or side word ends a negated list ("No pneumothorax, large right
    effusion.") unless "or", "nor" or "and" comes after that comma in the sentence ("No
    consolidation, large pleural effusion, or pneumothorax."). Scope that depends on what
    comes after the target is beyond ConText's rule fields, hence this callback.
    """
    breaks = re.compile(r",\s+(?:" + "|".join(re.escape(w) for w in words) + r")\b")
    goes_on = re.compile(r"\b(?:or|nor|and)\b")

    def check(target, modifier, span_between) -> bool:
        between = span_between.text.lower() if span_between is not None else ""
        found = breaks.search(between)
        if not found:
            return True
        rest = between[found.end() :] + " " + target.doc[target.end : target.sent.end].text.lower()
        return bool(goes_on.search(rest))

    return check


def _mention_value(ent) -> float:
    if ent._.target_rule.metadata.get("normal") or ent._.is_negated:
        return 0.0
    return -1.0 if ent._.is_uncertain else 1.0


def _aggregate(doc) -> dict[str, float | None]:
    result: dict[str, float | None] = dict.fromkeys(LABELS)
    for ent in doc.ents:
        if ent.label_ == IGNORE:
            continue
        v = _mention_value(ent)
        for label in ent.label_.split(SEPARATOR):
            old = result[label]
            # positive over uncertain over negative
            result[label] = v if old is None else max(old, v, key=lambda x: {1.0: 2, -1.0: 1, 0.0: 0}[x])
    result["No Finding"] = no_finding(result)
    return result


_DOTS = re.compile(r"\.(?:\s*\.)+")


def _clean(text: str) -> str:
    # MIMIC's de-identification "___" and IU's "XXXX" are words to nobody.
    # "effusion.. Minimal": a doubled period is not a sentence end to the sentencizer
    return _DOTS.sub(".", " ".join(text.replace("___", " ").replace("XXXX", " ").split()))


def label_report(text: str | None) -> dict[str, float | None]:
    """The 14 CheXpert labels of one report (1.0 / 0.0 / -1.0 / None)."""
    return label_reports([text])[0][0]


def label_reports(texts: Iterable[str | None], batch_size: int = 256) -> tuple[list[dict[str, float | None]], int]:
    """Label many reports (spaCy's ``pipe``); returns the labels and how many were empty or malformed."""
    texts = list(texts)
    ok = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    out: list[dict[str, float | None]] = [dict.fromkeys(LABELS) for _ in texts]
    docs = pipeline().pipe((_clean(texts[i]) for i in ok), batch_size=batch_size)
    for i, doc in zip(ok, docs, strict=True):
        out[i] = _aggregate(doc)
    return out, len(texts) - len(ok)


def mentions(text: str) -> list[tuple[str, str, float]]:
    """(observation, matched text, value) for each mention: what the labeler saw, for debugging a label."""
    doc = pipeline()(_clean(text))
    return [(ent.label_, ent.text, _mention_value(ent)) for ent in doc.ents if ent.label_ != IGNORE]
