"""Include blocks and the headline table: documents quote generated files, never retype them."""

import pytest

from melora.experiments.report import include
from melora.experiments.report.headline import headline, pivot, settled

TABLE = """# Title

intro

## Targets

- **PASS** one
- **FAIL** two

### detail

kept

## Timings

dropped
"""


def test_a_block_is_filled_with_its_file_or_its_section(tmp_path):
    (tmp_path / "bench.md").write_text(TABLE)
    doc = tmp_path / "README.md"
    doc.write_text("before\n<!-- include bench.md#Targets -->\nstale\n<!-- end include -->\nmiddle\n"
                   "<!-- include bench.md -->\n<!-- end include -->\nafter\n")
    assert include.update([doc], root=tmp_path) == [doc]
    text = doc.read_text()
    assert text.startswith("before\n<!-- include bench.md#Targets -->\n- **PASS** one\n- **FAIL** two\n\n### detail\n\nkept\n<!-- end include -->\nmiddle\n")
    assert "<!-- include bench.md -->\n" + TABLE + "<!-- end include -->\nafter\n" in text
    assert include.update([doc], root=tmp_path) == []  # already current: unchanged
    assert [(s, sec) for s, sec, _ in include.blocks(text)] == [("bench.md", "Targets"), ("bench.md", None)]


def test_a_missing_file_or_heading_is_named(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text("<!-- include nothing.md -->\n<!-- end include -->\n")
    with pytest.raises(FileNotFoundError, match="nothing.md not found"):
        include.update([doc], root=tmp_path)
    (tmp_path / "bench.md").write_text(TABLE)
    doc.write_text("<!-- include bench.md#Nope -->\n<!-- end include -->\n")
    with pytest.raises(ValueError, match="no heading 'Nope'"):
        include.update([doc], root=tmp_path)


def test_a_partial_results_build_keeps_the_blocks_of_files_it_has_not_made(tmp_path):
    doc = tmp_path / "README.md"
    (tmp_path / "bench.md").write_text(TABLE)
    kept = "<!-- include later.md -->\nold text\n<!-- end include -->\n"
    doc.write_text(kept + "<!-- include bench.md -->\n<!-- end include -->\n")
    missing: list[str] = []
    assert include.update([doc], root=tmp_path, missing=missing) == [doc]
    assert missing == ["later.md"]
    assert doc.read_text() == kept + "<!-- include bench.md -->\n" + TABLE + "<!-- end include -->\n"


HEADER = "method,task,chosen,lr,lr at grid edge,lrs tried,seeds,validation,test mean ± std,test 95% CI,Δ vs LoRA r=8 (paired),Δ 95% CI,verdict\n"


def rows_csv(seeds_melora: int = 5, edge: str = "—") -> str:
    return HEADER + (
        'LoRA r=8,SST-2,-,3e-3,—,"1e-3, 3e-3, 1e-2",5,82.5,80.8 ± 0.2,"[79.4, 82.3]",—,—,reference\n'
        f'MELoRA r=1,SST-2,n=8,3e-3,{edge},"1e-3, 3e-3, 1e-2",{seeds_melora},81.0,79.0 ± 0.5,"[78.0, 80.0]",-1.8,"[-3.0, -0.6]",worse\n'
        'LoRA r=8,MRPC,-,1e-3,—,"3e-4, 1e-3, 3e-3",5,71.7,75.9 ± 1.0,"[74.0, 77.0]",—,—,reference\n'
        f'MELoRA r=1,MRPC,n=2,1e-3,—,"3e-4, 1e-3, 3e-3",{seeds_melora},70.0,75.0 ± 1.0,"[74.0, 76.0]",-0.9,"[-2.0, 0.2]",no detectable difference\n'
    )


def test_the_headline_pivots_the_verdicts_and_says_when_they_are_provisional(tmp_path):
    (tmp_path / "table2_verdicts.csv").write_text(rows_csv())
    text = headline(tmp_path)
    assert "Provisional" not in text and "| vs LoRA r=8 | SST-2 | MRPC |" in text
    assert "| MELoRA r=1 | -1.8 [-3.0, -0.6] worse (lr 3e-3, n=8, 5 seeds) | -0.9 [-2.0, 0.2] no detectable difference (lr 1e-3, n=2, 5 seeds) |" in text
    (tmp_path / "table2_verdicts.csv").write_text(rows_csv(seeds_melora=2))
    assert "Provisional: the sweep is still running (2 of 4 cells with 5 seeds and a settled grid)" in headline(tmp_path)
    (tmp_path / "table2_verdicts.csv").write_text(rows_csv(edge="top (still being extended)"))
    assert "Provisional" in headline(tmp_path)


def test_the_headline_falls_back_to_the_heldout_table_only_without_a_dev_halves_one(tmp_path):
    assert headline(tmp_path) is None
    (tmp_path / "table2_heldout.csv").write_text(rows_csv().replace("test mean", "dev mean").replace("test 95%", "dev 95%"))
    assert "held-out tenth of the training subset" in headline(tmp_path)
    (tmp_path / "table2_verdicts.csv").write_text(rows_csv())
    assert "test half" in headline(tmp_path)


def test_settled_and_pivot_on_rows():
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(rows_csv())))
    assert settled(rows) == (True, "4 of 4 cells with 5 seeds and a settled grid")
    header, body = pivot(rows)
    assert header == ["vs LoRA r=8", "SST-2", "MRPC"] and [b[0] for b in body] == ["MELoRA r=1"]


def test_the_headline_says_each_methods_verdicts_in_words(tmp_path):
    import csv
    import io

    from melora.experiments.report.headline import in_words

    rows = list(csv.DictReader(io.StringIO(rows_csv())))
    assert in_words(rows) == "- MELoRA r=1: worse than LoRA r=8 on SST-2; no detectable difference on MRPC.\n"
    rows[1]["verdict"] = "better"
    rows[3]["verdict"] = "better"
    assert in_words(rows) == "- MELoRA r=1: better than LoRA r=8 on SST-2, MRPC.\n"
    (tmp_path / "table2_verdicts.csv").write_text(rows_csv())
    assert headline(tmp_path).endswith("\n\n" + in_words(list(csv.DictReader(io.StringIO(rows_csv())))))


def test_the_headline_stays_provisional_until_every_cell_has_the_specs_seeds(tmp_path):
    (tmp_path / "table2_verdicts.csv").write_text(rows_csv(seeds_melora=3).replace(",5,", ",3,"))
    assert "Provisional" not in headline(tmp_path)  # without the spec: three seeds everywhere is enough
    assert "Provisional: the sweep is still running (0 of 4 cells with 5 seeds and a settled grid)" in headline(tmp_path, wanted_seeds=5)
    (tmp_path / "table2_verdicts.csv").write_text(rows_csv())
    assert "Provisional" not in headline(tmp_path, wanted_seeds=5)


def test_the_results_build_reads_the_seeds_wanted_from_each_rows_spec():
    from melora.experiments.report.build import _verdict_seeds

    records = [{"profile": "mini", "selection": {"split": "dev_halves"}}]
    mini = _verdict_seeds(records, None)
    assert {row: mini[row] for row in ("LoRA r=8", "MELoRA r=8", "MELoRA r=1", "MELoRA n=4 r=1")} == dict.fromkeys(
        ("LoRA r=8", "MELoRA r=8", "MELoRA r=1", "MELoRA n=4 r=1"), 5)  # experiments/verdicts.yaml
    assert {row: mini[row] for row in ("DyLoRA r=8", "AdaLoRA r=8", "Delta-LoRA r=8")} == dict.fromkeys(
        ("DyLoRA r=8", "AdaLoRA r=8", "Delta-LoRA r=8"), 3)  # experiments/verdicts_baselines.yaml
    assert _verdict_seeds(records, "smoke")["LoRA r=8"] == 2 and _verdict_seeds(records, "smoke")["DyLoRA r=8"] == 1
    assert _verdict_seeds([], None) is None


def test_a_row_with_fewer_seeds_by_design_does_not_keep_the_headline_provisional(tmp_path):
    melora = [line for line in rows_csv().splitlines() if line.startswith("MELoRA r=1,")]
    baselines = "".join(line.replace("MELoRA r=1,", "DyLoRA r=8,").replace("n=8", "-").replace("n=2", "-") + "\n" for line in melora)
    (tmp_path / "table2_verdicts.csv").write_text(rows_csv() + baselines.replace(",5,", ",3,"))
    wanted = {"LoRA r=8": 5, "MELoRA r=1": 5, "DyLoRA r=8": 3}
    assert "Provisional" not in headline(tmp_path, wanted)
    assert "Provisional" in headline(tmp_path, 5)  # every row held to five seeds: the baselines never get there
    (tmp_path / "table2_verdicts.csv").write_text(rows_csv(seeds_melora=4) + baselines.replace(",5,", ",2,"))
    assert ("Provisional: the sweep is still running (2 of 6 cells with 5 seeds (3 for DyLoRA r=8) and a settled grid)"
            in headline(tmp_path, wanted))
