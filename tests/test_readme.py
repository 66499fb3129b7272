"""The README's quick start is what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if line.strip() == "```bash"]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) >= 2 and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_job_is_a_real_command():
    assert readme_commands()[0].startswith("pip install torch==2.13.0 -e .") and "hf-sam-peft" in readme_commands()[0]
