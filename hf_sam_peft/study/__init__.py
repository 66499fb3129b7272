"""The study in one command: methods × datasets × seeds (× base models, × ablation values), trained and scored
with the paper's protocol, with the paper's tables and plots (`hf-sam-peft study STUDY.yaml`, :func:`run_study`)."""

from .report import collect_records, efficiency_points, markdown_report, write_reports
from .runner import StudyResult, run_study, study_folder
from .spec import Cell, StudySpec, expand_cells, load_study, study_from_dict

__all__ = [
    "Cell", "StudyResult", "StudySpec", "collect_records", "efficiency_points", "expand_cells", "load_study",
    "markdown_report", "run_study", "study_folder", "study_from_dict", "write_reports",
]
