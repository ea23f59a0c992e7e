"""The README's machine diagrams are the tables themselves: regenerate them and compare."""

from __future__ import annotations

from pathlib import Path

from agentd.call.diagram import BEGIN, END, main, mermaid, render
from agentd.call.phase import PHASE_TABLE, Phase, PhaseInput

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_committed_diagrams_match_the_tables() -> None:
    text = README.read_text()
    section = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert section == render(), "run `python -m agentd.call.diagram --write` and commit README.md"


def test_every_table_row_is_an_edge() -> None:
    diagram = mermaid(PHASE_TABLE)
    assert "ANSWERED --> ACTIVE: greeted" in diagram
    edges = sum(line.count(" / ") + 1 for line in diagram.splitlines()[1:])
    assert edges == len(PHASE_TABLE)
    assert (Phase.ACTIVE, PhaseInput.RINGING) not in PHASE_TABLE


def test_write_replaces_only_the_generated_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\nstale\n{END}\n\nafter\n")
    assert main(["--write", "--readme", str(readme)]) == 0
    assert readme.read_text() == f"# title\n\n{render()}\n\nafter\n"
