"""hybridprune: prune any Hugging Face causal LM, fine-tune it without regrowing weights, measure the cost."""
from .engine import PruneConfig, PruneResult, load_tier_maps, prune, save_pruned
from .errors import HybridPruneError
from .evaluate import perplexity
from .kernels import PackedLinear, sparsify_
from .models import find_decoder_layers, find_linears, load_model, save_model, sparsity_report
from .packing import load_packed, pack_folder, unpack_folder
from .patterns import NM, TieredBlocks, Unstructured, block_pattern, block_topk_pattern, make_pattern

__version__ = "0.1.0"
__all__ = ["PruneConfig", "PruneResult", "prune", "save_pruned", "load_tier_maps", "HybridPruneError",
           "perplexity", "load_model", "save_model", "sparsity_report", "find_decoder_layers", "find_linears",
           "NM", "TieredBlocks", "Unstructured", "block_pattern", "block_topk_pattern", "make_pattern",
           "pack_folder", "unpack_folder", "load_packed", "sparsify_", "PackedLinear"]
