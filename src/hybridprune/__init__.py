"""hybridprune: prune any Hugging Face causal LM, fine-tune it without regrowing weights, measure the cost.

The names below load their module on first use: `import hybridprune.experiment` (the experiment's parent process,
which only plans and reports) does not import torch.
"""
import importlib

__version__ = "0.1.0"
_HOME = {
    "engine": ["PruneConfig", "PruneResult", "prune", "save_pruned", "load_tier_maps"],
    "errors": ["HybridPruneError"],
    "evaluate": ["perplexity"],
    "models": ["load_model", "save_model", "sparsity_report", "find_decoder_layers", "find_linears"],
    "patterns": ["NM", "TieredBlocks", "Unstructured", "block_pattern", "block_topk_pattern", "make_pattern"],
    "packing": ["pack_folder", "unpack_folder", "load_packed"],
    "kernels": ["sparsify_", "PackedLinear"],
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'hybridprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
