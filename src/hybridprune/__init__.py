"""hybridprune: prune any Hugging Face causal LM, fine-tune it without regrowing weights, measure the cost.

    import hybridprune as hp
    pm = hp.prune(hp.load("default"), hp.PruneConfig(method="wanda", pattern="2:4"))
    pm.save("out/model")

The names below load their module on first use, so `import hybridprune` is cheap and the configs
(`hp.PruneConfig`, `hp.FinetuneConfig`) import no torch. Type checkers read the imports under TYPE_CHECKING.
"""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

__version__ = "0.3.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())  # the application decides where logs go

_HOME = {
    "hybridprune.api": ["PrunedModel", "load", "prune", "finetune", "evaluate", "save", "use_kernels"],
    "hybridprune.core.config": ["PruneConfig", "FinetuneConfig"],
    "hybridprune.core.errors": ["HybridPruneError"],
    "hybridprune.pruning.engine": ["PruneResult"],
    "hybridprune.io.folder": ["load_tier_maps"],
    "hybridprune.io.models": ["sparsity_report", "find_decoder_layers", "find_linears"],
    "hybridprune.evaluation.ppl": ["perplexity"],
    "hybridprune.sparse.load": ["load_model"],
    "hybridprune.sparse.packing": ["pack_folder", "unpack_folder"],
    "hybridprune.sparse.kernels": ["sparsify_", "PackedLinear"],
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}
__all__ = [
    "PrunedModel", "load", "prune", "finetune", "evaluate", "save",
    "use_kernels", "PruneConfig", "FinetuneConfig", "HybridPruneError", "PruneResult", "load_tier_maps",
    "sparsity_report", "find_decoder_layers", "find_linears", "perplexity", "load_model", "pack_folder",
    "unpack_folder", "sparsify_", "PackedLinear",
]

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on first use
    from hybridprune.api import PrunedModel, evaluate, finetune, load, prune, save, use_kernels
    from hybridprune.core.config import FinetuneConfig, PruneConfig
    from hybridprune.core.errors import HybridPruneError
    from hybridprune.evaluation.ppl import perplexity
    from hybridprune.io.folder import load_tier_maps
    from hybridprune.io.models import find_decoder_layers, find_linears, sparsity_report
    from hybridprune.pruning.engine import PruneResult
    from hybridprune.sparse.kernels import PackedLinear, sparsify_
    from hybridprune.sparse.load import load_model
    from hybridprune.sparse.packing import pack_folder, unpack_folder


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'hybridprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
