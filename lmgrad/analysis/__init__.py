"""Task spaces from stored sketches: similarity, uncertainty, hypothesis tests, figures, report."""
from lmgrad.analysis.hypothesis import (Hypothesis, categorical, hypothesis_matrix,
                                        load_hypothesis, resolve_hypothesis, taxonomy_from_meta)
from lmgrad.analysis.report import provenance_from_manifest
from lmgrad.analysis.result import TaskSpaceResult
from lmgrad.analysis.space import (ParamInfo, block_similarities, check_sketches, coherence,
                                   group_columns, pair_cosine_matrix, pair_cosine_samples,
                                   parse_param_name, similarity, task_means, task_similarity)
from lmgrad.analysis.stats import (StatResult, adjusted_rand_index, cluster_agreement,
                                   compare_task_spaces, mantel, offdiag_correlation,
                                   within_between)
from lmgrad.analysis.task_space import analyze, save, stats_dict
from lmgrad.analysis.uncertainty import Reliability, offdiag

__all__ = [
    "Hypothesis", "ParamInfo", "Reliability", "StatResult", "TaskSpaceResult",
    "adjusted_rand_index", "analyze", "block_similarities", "categorical",
    "check_sketches", "cluster_agreement", "coherence", "compare_task_spaces", "group_columns",
    "hypothesis_matrix", "load_hypothesis", "mantel", "offdiag", "offdiag_correlation",
    "pair_cosine_matrix", "pair_cosine_samples", "parse_param_name", "provenance_from_manifest",
    "resolve_hypothesis", "save", "similarity", "stats_dict",
    "task_means", "task_similarity", "taxonomy_from_meta", "within_between",
]
