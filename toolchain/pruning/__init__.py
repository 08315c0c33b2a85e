"""Channel pruning: importance criteria, budget search, physical removal, save/load.

Typical use::

    result = prune_to_target(model, example_inputs=torch.randn(1, 3, 32, 32),
                             criterion="adv-taylor", macs_reduction=4.0, steps=3,
                             importance_loader=train_loader)
    save_pruned("pruned.pt", spec=spec, history=result.history, state_dict=model.state_dict())
"""

from toolchain.pruning.criteria import CRITERIA, CriterionInfo, SeededRandomImportance, TaylorImportance
from toolchain.pruning.graph import classifier_layers, count_macs_params
from toolchain.pruning.io import load_pruned, read_pruned, rebuild_pruned, save_pruned
from toolchain.pruning.methods import METHODS, PruneJob, PruneResult, prune_model
from toolchain.pruning.prune import prune_to_target
from toolchain.pruning.scores import DEFAULT_ATTACK, accumulate_gradients, compute_scores

__all__ = [
    "CRITERIA",
    "DEFAULT_ATTACK",
    "METHODS",
    "CriterionInfo",
    "PruneJob",
    "PruneResult",
    "SeededRandomImportance",
    "TaylorImportance",
    "accumulate_gradients",
    "classifier_layers",
    "compute_scores",
    "count_macs_params",
    "load_pruned",
    "prune_model",
    "prune_to_target",
    "read_pruned",
    "rebuild_pruned",
    "save_pruned",
]
