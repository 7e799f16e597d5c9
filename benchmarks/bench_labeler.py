"""The report labeler against human annotation: IU X-ray reports (development half) and their MeSH headings.

For each of the ten observations MeSH maps to (``reports/iu_xray.py``), precision, recall and
F1 of "positive" (label 1; uncertain counted as negative, and as positive on the macro line
below it) against "MeSH names it", over the even-id IU reports with text. Beside it, a plain
negation-aware keyword labeler with the vocabulary's mentions (phrases and token patterns): a mention is positive
unless "no", "not", "without", "negative for", "free of" or "clear of" comes earlier in its
sentence; what ConText adds is the difference. Throughput: reports per second on one core
(spaCy runs single-threaded), the pipeline built before the clock starts.

    python benchmarks/bench_labeler.py [--errors LABEL]

Last line: ``labeler: macro-F1 <x> over 10 findings (keyword baseline <y>); <n> reports/s``
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|clear of)\b")


def keyword_labeler():
    """Labels from the vocabulary's mentions (its phrases and its token patterns, matched by spaCy's
    PhraseMatcher and Matcher on the same blank-English tokens the labeler uses) with sentence-level
    negation by keyword (the baseline): everything the labeler knows except ConText."""
    import spacy
    from spacy.matcher import Matcher, PhraseMatcher

    from cxr_pipeline.reports.labeler import SEPARATOR, vocabulary

    nlp = spacy.blank("en")
    phrases, patterns = PhraseMatcher(nlp.vocab, attr="LOWER"), Matcher(nlp.vocab)
    for label, entry in vocabulary()["observations"].items():
        for k, p in enumerate(entry.get("mentions", [])):
            if isinstance(p, str):
                phrases.add(label, [nlp.make_doc(p)])
            else:
                patterns.add(f"{label}#{k}", [p])

    def label(text: str) -> set[str]:
        pos = set()
        for sent in re.split(r"(?<=[.;!?])\s+", text.lower()):
            doc = nlp.make_doc(sent)
            for match_id, start, _end in [*phrases(doc), *patterns(doc)]:
                if not NEGATION.search(doc[:start].text):
                    pos.update(nlp.vocab.strings[match_id].split("#")[0].split(SEPARATOR))
        return pos

    return label


def prf(truth: list[set[str]], pred: list[set[str]], label: str) -> tuple[float, float, float, int]:
    tp = sum(label in t and label in p for t, p in zip(truth, pred, strict=True))
    fp = sum(label not in t and label in p for t, p in zip(truth, pred, strict=True))
    fn = sum(label in t and label not in p for t, p in zip(truth, pred, strict=True))
    pr = tp / (tp + fp) if tp + fp else 0.0
    rc = tp / (tp + fn) if tp + fn else 0.0
    return pr, rc, (2 * pr * rc / (pr + rc) if pr + rc else 0.0), tp + fn


def main() -> int:
    from cxr_pipeline.reports import iu_xray
    from cxr_pipeline.reports.labeler import label_reports, labeler_version, pipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--errors", default="", help="print the false positives and negatives of this observation")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    reports = list(iu_xray.development_reports())
    texts = [r.text for r in reports]
    truth = [r.observations() for r in reports]
    pipeline()  # built before the clock starts
    t0 = time.perf_counter()
    labels, _ = label_reports(texts)
    rate = len(texts) / (time.perf_counter() - t0)
    strict = [{k for k, v in row.items() if v == 1.0} for row in labels]
    loose = [{k for k, v in row.items() if v in (1.0, -1.0)} for row in labels]
    kw = keyword_labeler()
    t0 = time.perf_counter()
    base = [kw(t) for t in texts]
    kw_rate = len(texts) / (time.perf_counter() - t0)
    print(f"IU X-ray development half (even ids): {len(reports)} reports with text; labeler {labeler_version()}")
    print(f"{'observation':20s} {'MeSH+':>6s} {'P':>6s} {'R':>6s} {'F1':>6s} | keyword {'P':>6s} {'R':>6s} {'F1':>6s}")
    f1s, kf1s, lf1s = [], [], []
    for label in iu_xray.FINDINGS10:
        p, r, f, n = prf(truth, strict, label)
        kp, kr, kf, _ = prf(truth, base, label)
        lf1s.append(prf(truth, loose, label)[2])
        f1s.append(f)
        kf1s.append(kf)
        print(f"{label:20s} {n:6d} {p:6.3f} {r:6.3f} {f:6.3f} |         {kp:6.3f} {kr:6.3f} {kf:6.3f}")
    macro, kmacro = sum(f1s) / len(f1s), sum(kf1s) / len(kf1s)
    print(f"{'macro':20s} {'':6s} {'':6s} {'':6s} {macro:6.3f} |         {'':6s} {'':6s} {kmacro:6.3f}")
    print(f"uncertain counted as positive: macro-F1 {sum(lf1s) / len(lf1s):.3f}")
    print(f"speed, one core: labeler {rate:.0f} reports/s, keyword baseline {kw_rate:.0f} reports/s (ratio {rate / kw_rate:.2f})")
    if args.errors:
        for r, t, p in zip(reports, truth, strict, strict=True):
            if (args.errors in t) != (args.errors in p):
                kind = "FN" if args.errors in t else "FP"
                print(f"{kind} {r.id}: {r.text}\n    MeSH: {'; '.join(r.mesh_major)}")
    print(f"labeler: macro-F1 {macro:.2f} over 10 findings (keyword baseline {kmacro:.2f}); {rate:.0f} reports/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
