"""Transfer-based task spaces: fine-tuning via gradient differentials (FTGD) on many tasks at once.

* `objective`: margin objectives (plain differential, logistic, hinge) and the global top-p mask.
* `tune`: seeded train/held-out splits, the jit(vmap) tuning step over a group of tasks, tuning
  in groups, evaluation of tuned models (held-out accuracy, margin, neutral perplexity).
* `predict`: task gradients, the first-order prediction ⟨h_j, M_i ⊙ ∇L_i⟩, QAP correlations, mask
  overlap (Jaccard overall, per layer and module type), auxiliary-task ranking quality.

The job that ties them together is `lmgrad.jobs.probe` (`launch/probe.py`).
"""

from lmgrad.transfer.objective import (OBJECTIVES, check_top_p, margin_loss, n_kept, pack_mask,
                                       per_pair_objective, top_p_mask, unpack_mask)
from lmgrad.transfer.predict import (TaskGradFn, cosine_matrix, first_order_matrix, make_task_grad_fn, mask_overlap,
                                     qap_correlation, rank_candidates, ranking_quality, task_gradient, vectorize)
from lmgrad.transfer.tune import (OPTIMIZERS, SCHEDULES, EncodedPairs, EvalSet, Evaluation, PairPacking, TunedGroup,
                                  TuneSpec, encode_task_pairs, evaluate, make_group_scorer, make_group_step,
                                  packed_step_batches, pair_packing, score_models, split_pairs, step_batches,
                                  step_packing, train_length, tune_tasks)

__all__ = [
    "OBJECTIVES", "OPTIMIZERS", "SCHEDULES", "EncodedPairs", "EvalSet", "Evaluation", "PairPacking", "TaskGradFn",
    "TuneSpec", "TunedGroup", "packed_step_batches", "pair_packing", "step_packing",
    "check_top_p", "cosine_matrix", "encode_task_pairs", "evaluate", "first_order_matrix", "make_group_scorer",
    "make_group_step", "make_task_grad_fn", "margin_loss", "mask_overlap", "n_kept", "pack_mask",
    "per_pair_objective", "qap_correlation", "rank_candidates", "ranking_quality", "score_models", "split_pairs",
    "step_batches", "task_gradient", "top_p_mask", "train_length", "tune_tasks", "unpack_mask", "vectorize",
]
