from cxr_pipeline.data.sections import normalize_section_name, parse_report, section_text

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___ year old woman with ?pleural effusion  // ?pleural effusion
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  ___
 
 FINDINGS: 
 
 Cardiac size cannot be evaluated.  Large left pleural effusion is new.  Small
 right effusion is also present.
 
 IMPRESSION: 
 
 Large left pleural effusion
"""


def test_findings_and_impression_from_the_format_example():
    r = parse_report(REPORT)
    assert r.findings == "Cardiac size cannot be evaluated. Large left pleural effusion is new. Small right effusion is also present."
    assert r.impression == "Large left pleural effusion"
    assert r.last_paragraph is None


def test_section_names_are_normalised_like_the_authors():
    assert normalize_section_name("CONCLUSION") == "impression"
    assert normalize_section_name("REASON FOR EXAM") == "indication"
    assert normalize_section_name("IMPRESSON") == "impression"
    assert normalize_section_name("FINDINGS AND IMPRESSION") == "impression"
    assert normalize_section_name("PA AND LATERAL VIEWS OF THE CHEST") == "findings"
    assert normalize_section_name("CLINICAL HISTORY") == "history"


def test_conclusion_counts_as_impression():
    r = parse_report(" FINAL REPORT\n INDICATION:  cough\n \n CONCLUSION:  No pneumonia.\n")
    assert r.impression == "No pneumonia."


def test_empty_findings_is_dropped_and_last_occurrence_wins():
    text = " FINAL REPORT\n FINDINGS: \n \n IMPRESSION:  First.\n \n IMPRESSION:  Second\n impression.\n"
    names = section_text(text)[1]
    assert "findings" not in names
    assert parse_report(text).impression == "Second impression."


def test_last_paragraph_when_neither_section_exists():
    text = " FINAL REPORT\n EXAMINATION:  CHEST\n \n TECHNIQUE:  single view\n \n Lungs are clear.  No effusion.\n"
    r = parse_report(text)
    assert r.findings is None and r.impression is None
    assert r.last_paragraph == "Lungs are clear. No effusion."


def test_report_without_any_header_is_not_an_error():
    r = parse_report("just some text\n")
    assert (r.findings, r.impression, r.last_paragraph) == (None, None, None)
