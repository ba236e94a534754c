
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from hybridprune import PruneConfig
from hybridprune.core.errors import HybridPruneError
from hybridprune.finetuning.finetune import (
    FinetuneConfig,
    build_dataset,
    capture_masks,
    encode_example,
    finetune,
    merge_lora_through_mask,
    render,
)
from hybridprune.io.models import prunable_matrices, weight_matrix
from hybridprune.pruning.engine import prune
from hybridprune.pruning.patterns import check_nm


def _pruned(family, pattern, samples, **kw):
    model = tiny_model(family, **kw)
    prune(model, PruneConfig(pattern=pattern, nsamples=6, seqlen=24, device="cpu"), samples=samples)
    return model


class _Tok:
    """Whitespace tokenizer over a tiny vocabulary: enough to drive the Trainer on tiny models."""
    eos_token_id = 1
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + (hash(w) % 200) for w in text.split()]
        return {"input_ids": ([3] if add_special_tokens else []) + ids}


@pytest.mark.parametrize("family,pattern,kw", [("llama", "unstructured", {}), ("llama", "2:4", {}),
                                                ("llama", "three-tier", dict(hidden=40, inter=72)),
                                                ("gpt2", "unstructured", {})])
def test_lora_merge_through_mask_keeps_zeros(family, pattern, kw, samples):
    from peft import LoraConfig, get_peft_model
    model = _pruned(family, pattern, samples, **kw)
    masks = capture_masks(model)
    targets = sorted({n.rsplit(".", 1)[-1] for n in prunable_matrices(model)})
    before = {n: m.weight.detach().clone() for n, m in prunable_matrices(model).items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                                                  fan_in_fan_out=family == "gpt2"))
    merged = merge_lora_through_mask(peft_model, masks)
    assert set(prunable_matrices(merged)) == set(masks)  # no LoRA modules left behind
    for name, mod in prunable_matrices(merged).items():
        assert not ((mod.weight != 0) & ~masks[name]).any(), name
        assert not torch.equal(mod.weight, before[name]), name  # the update did land on the kept weights
        if pattern == "2:4":
            assert check_nm(weight_matrix(mod) != 0, 2, 4)


def test_unmasked_merge_would_destroy_sparsity(samples):
    """The failure this guards against: PEFT's own merge adds a dense delta."""
    from peft import LoraConfig, get_peft_model
    model = _pruned("llama", "unstructured", samples)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    merged = peft_model.merge_and_unload()
    q = merged.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean() < 0.01


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_keeps_zero_set(method, samples, tmp_path, monkeypatch):
    model = _pruned("llama", "unstructured", samples)
    masks = capture_masks(model)
    rows = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in samples]
    monkeypatch.setattr("hybridprune.finetuning.finetune.build_dataset", lambda cfg, tok, cache=None: rows)
    trims = []  # freed heap goes back to the OS after every step (a SQuAD LoRA stage's RSS climbed without it)
    monkeypatch.setattr("hybridprune.finetuning.finetune.trim_heap", lambda: trims.append(1))
    cfg = FinetuneConfig(method=method, steps=4, batch_size=2, lr=1e-2, logging_steps=1, save_steps=100)
    before = {n: m.weight.detach().clone() for n, m in prunable_matrices(model).items()}
    res = finetune(model, _Tok(), cfg, tmp_path / "work")
    out = res["model"]
    for name, mod in prunable_matrices(out).items():
        assert torch.equal(mod.weight != 0, masks[name]), name
        moved = (mod.weight.detach() - before[name])[masks[name]].abs().max()
        assert moved > 1e-4, f"{name} did not train ({float(moved)})"  # every kept matrix really moved
    assert res["record"]["zeros_preserved"] == sum(int((~m).sum()) for m in masks.values())
    assert len(res["losses"]) == 4 and len(trims) == 4


def test_labels_mask_exactly_the_prompt(default_tokenizer, data_dir):
    tok = default_tokenizer
    for data, template in [("squad", "simple"), ("squad", "alpaca"), ("squad", "chat"), ("gsm8k", "simple"),
                           ("boolq", "simple"), ("gsm8k", "chat")]:
        rows = build_dataset(FinetuneConfig(data=data, template=template, max_examples=3, seqlen=4096), tok)
        from hybridprune.finetuning.finetune import _records
        rec = _records(data, data_dir)[0]
        prompt, answer = render(data, template, rec, tok)
        p_len = len(tok(prompt)["input_ids"])
        r = rows[0]
        assert all(x == -100 for x in r["labels"][:p_len])
        assert r["labels"][p_len:] == r["input_ids"][p_len:] and r["labels"][-1] == tok.eos_token_id
        assert tok.decode(r["labels"][p_len:-1]).strip() == answer.strip()
    assert render("boolq", "simple", {"passage": "P", "question": "is it", "answer": "yes"}, tok) == \
        ("P\nQuestion: is it?\nAnswer:", " yes")


def test_squad_finetuning_uses_fit_half_only(default_tokenizer, data_dir):
    from hybridprune.finetuning.finetune import _records
    from hybridprune.io.data import squad_examples
    fit_contexts = {r["context"] for r in squad_examples("fit", data_dir)}
    assert all(r["context"] in fit_contexts for r in _records("squad", data_dir))


def test_finetune_bad_input():
    with pytest.raises(HybridPruneError, match="unknown fine-tuning data"):
        FinetuneConfig(data="pile")
    with pytest.raises(HybridPruneError, match="steps"):
        FinetuneConfig(steps=0)
    with pytest.raises(HybridPruneError, match="unknown template"):
        FinetuneConfig(data="gsm8k", template="alpaca")
    with pytest.raises(HybridPruneError, match="lora or full"):
        FinetuneConfig(method="qlora")
    with pytest.raises(HybridPruneError, match="needs the field"):
        render("squad", "simple", {"context": "c"}, None)


def test_encode_example_truncates_safely():
    tok = _Tok()
    ex = encode_example("a b c d", " e f", tok, seqlen=4)
    assert len(ex["input_ids"]) == 4 and ex["labels"] == [-100] * 4


def test_full_tuning_gradients_are_zero_where_pruned(samples):
    """The gradient mask alone, after backward and before any optimizer step."""
    from hybridprune.finetuning.finetune import mask_gradients
    model = _pruned("llama", "unstructured", samples)
    masks = capture_masks(model)
    hooks, reapply = mask_gradients(model, masks)
    model(input_ids=samples, labels=samples).loss.backward()
    for name, mod in prunable_matrices(model).items():
        g = mod.weight.grad
        assert (g[~masks[name]] == 0).all(), name
        assert g[masks[name]].abs().sum() > 0, name  # kept weights do get gradients
    for h in hooks:
        h.remove()


def test_tokenized_data_is_cached_by_what_it_depends_on(tmp_path, default_tokenizer, data_dir, monkeypatch):
    import dataclasses

    from hybridprune.finetuning import finetune as ft
    config = ft.FinetuneConfig(data="squad", seqlen=512, max_examples=5, data_dir=str(data_dir))
    rows = ft.build_dataset(config, default_tokenizer, tmp_path)
    calls, plain = [], ft.encode_example
    monkeypatch.setattr(ft, "encode_example", lambda *a, **k: calls.append(1) or plain(*a, **k))
    assert ft.build_dataset(config, default_tokenizer, tmp_path) == rows and calls == []  # read, not tokenized
    alpaca = ft.build_dataset(dataclasses.replace(config, template="alpaca"), default_tokenizer, tmp_path)
    assert calls and len(list(tmp_path.glob("squad-*.json"))) == 2  # another template is another entry
    assert alpaca != rows and rows == ft.build_dataset(config, default_tokenizer)  # the cache holds what it builds


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_answer_only_logits_give_the_models_own_loss(family):
    """Training computes the output layer only where a label follows (logits_to_keep); the loss equals the model's
    own causal-LM loss on full logits, padding and a prompt-only row included."""
    from hybridprune.finetuning.finetune import _Collator, answer_loss
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, prompt in ((20, 14), (13, 9), (17, 17)):  # the last row is all prompt: nothing to learn from it
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = _Collator(0, logits_to_keep=True)(rows)
    labels = batch.pop("labels")
    out = model(**batch)
    assert out.logits.shape[1] == len(batch["logits_to_keep"]) == 10  # positions 13..18 and 8..11, unioned
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    torch.testing.assert_close(answer_loss(out, labels), full.loss, rtol=1e-6, atol=1e-6)
    # a model without logits_to_keep hands over all logits: the same loss
    torch.testing.assert_close(answer_loss(full, labels), full.loss, rtol=1e-6, atol=1e-6)
    n = int((labels[:, 1:] != -100).sum())  # accumulated batches divide by their shared count
    torch.testing.assert_close(answer_loss(out, labels, num_items_in_batch=2 * n), full.loss / 2, rtol=1e-6,
                               atol=1e-6)


def test_gradient_checkpointing_recomputes_layers_and_changes_no_number(samples, tmp_path, monkeypatch):
    """On by default: every decoder layer runs again in the backward pass (its activations are not kept), and the
    trained weights are exactly those of a run that keeps them (dropout's random state is replayed)."""
    from hybridprune.io.models import find_decoder_layers, find_linears
    rows = [{"input_ids": s.tolist(), "labels": [-100] * 8 + s.tolist()[8:]} for s in samples]
    monkeypatch.setattr("hybridprune.finetuning.finetune.build_dataset", lambda cfg, tok, cache=None: rows)
    weights, calls = {}, {}
    for gc in (True, False):
        model = _pruned("llama", "unstructured", samples)
        n = calls[gc] = [0]
        down = find_linears(find_decoder_layers(model)[1][0])["mlp.down_proj"]  # runs inside the layer's forward
        down.register_forward_hook(lambda *a, n=n: n.__setitem__(0, n[0] + 1))
        cfg = FinetuneConfig(method="lora", steps=3, batch_size=2, lr=1e-2, lora_dropout=0.1, save_steps=100,
                             gradient_checkpointing=gc)
        assert FinetuneConfig().gradient_checkpointing
        out = finetune(model, _Tok(), cfg, tmp_path / f"work{gc}")["model"]
        weights[gc] = {k: v.detach().clone() for k, v in out.state_dict().items()}
    assert calls[True][0] == 2 * calls[False][0] == 6  # forward, then again in backward
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[False])


def test_token_rows_hold_the_rows_compactly_and_collate_the_same():
    """The training rows are flat int32 tensors with offsets (not Python lists); each row and each batch is what
    the lists would give."""
    from hybridprune.finetuning.finetune import TokenRows, _Collator
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in (5, 1, 17, 9):
        ids = torch.randint(0, 49_000, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    data = TokenRows(rows)
    assert len(data) == 4 and data.ids.dtype == torch.int32 and data.ids.numel() == 32
    for i, r in enumerate(rows):
        assert data[i]["input_ids"].tolist() == r["input_ids"] and data[i]["labels"].tolist() == r["labels"]
    a, b = _Collator(0, True)([data[i] for i in (2, 0, 3)]), _Collator(0, True)([rows[i] for i in (2, 0, 3)])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_keeps_no_masks_through_training_and_checks_zero_counts(samples, tmp_path, monkeypatch):
    """LoRA freezes the base: the merge reads each matrix's own non-zero set, so no bool masks are held through
    training (101 MiB on the default model); a matrix that lost a zero is still an error."""
    from hybridprune.finetuning import finetune as ft
    model = _pruned("llama", "unstructured", samples)
    masks = capture_masks(model)
    rows = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in samples]
    monkeypatch.setattr(ft, "build_dataset", lambda cfg, tok, cache=None: rows)
    monkeypatch.setattr(ft, "capture_masks", lambda m: pytest.fail("LoRA captured the masks"))
    cfg = FinetuneConfig(method="lora", steps=2, batch_size=2, lr=1e-2, save_steps=100)
    out = finetune(model, _Tok(), cfg, tmp_path / "work")["model"]
    for name, mod in prunable_matrices(out).items():
        assert torch.equal(mod.weight != 0, masks[name]), name
    counts = ft.zero_counts(out)
    q = next(n for n in counts if n.endswith("q_proj"))
    with torch.no_grad():
        prunable_matrices(out)[q].weight[prunable_matrices(out)[q].weight == 0] = 0.5  # regrow them all
    with pytest.raises(HybridPruneError, match=f"regrew {counts[q]} pruned weights in {q}"):
        ft.check_zero_counts(out, counts)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_fp32_weights(samples, tmp_path, monkeypatch):
    from hybridprune.io.models import find_decoder_layers, find_linears
    rows = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in samples]
    monkeypatch.setattr("hybridprune.finetuning.finetune.build_dataset", lambda cfg, tok, cache=None: rows)
    with pytest.raises(HybridPruneError, match="autocast must be auto, bf16 or fp32"):
        FinetuneConfig(autocast="fp16")
    for autocast, want in (("auto", torch.float32), ("bf16", torch.bfloat16)):  # auto on a CPU: fp32
        model = _pruned("llama", "unstructured", samples)
        masks = capture_masks(model)
        seen = set()
        down = find_linears(find_decoder_layers(model)[1][0])["mlp.down_proj"]
        down.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        cfg = FinetuneConfig(method="lora", steps=2, batch_size=2, lr=1e-2, save_steps=100, autocast=autocast)
        res = finetune(model, _Tok(), cfg, tmp_path / f"work-{autocast}")
        assert seen == {want} and res["record"]["autocast"] == {"auto": "fp32", "bf16": "bf16"}[autocast]
        for name, mod in prunable_matrices(res["model"]).items():
            assert mod.weight.dtype == torch.float32 and torch.equal(mod.weight != 0, masks[name]), name


@pytest.mark.kernels
def test_hash_dropout_keeps_each_element_with_1_minus_p():
    """csrc/dropout.cpp: the dropped share is p within 5 sigma, kept values are x / (1 - p) exactly, the AVX-512
    and portable paths agree bit for bit, a seed gives one mask and another seed another, any float dtype."""
    from hybridprune.finetuning.finetune import _dropout_ext
    ext = _dropout_ext()
    x = torch.randn(1_000_003)
    for p in (0.05, 0.3):
        y = ext.hash_dropout(x, p, 12345, False)
        dropped = float((y == 0).double().mean())
        assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5, (p, dropped)
        kept = y != 0
        assert torch.equal(y[kept], x[kept] * torch.tensor(1 / (1 - p), dtype=torch.float32))
        assert torch.equal(y, ext.hash_dropout(x, p, 12345, True))  # the portable path
        assert torch.equal(y, ext.hash_dropout(x, p, 12345, False))
        other = ext.hash_dropout(x, p, 12346, False) != 0
        assert 0.5 * 2 * p * (1 - p) < float((other != kept).double().mean()) < 1.5 * 2 * p * (1 - p)
    # neighbouring elements and blocks are independent: the mask of row i says nothing of row i+1's
    m = (ext.hash_dropout(torch.ones(2000, 512), 0.5, 7, False) != 0).double()
    assert abs(float((m[:-1] * m[1:]).mean()) - 0.25) < 0.01
    assert abs(float((m[:, :-1] * m[:, 1:]).mean()) - 0.25) < 0.01
    xb = x[:4096].to(torch.bfloat16)
    yb = ext.hash_dropout(xb, 0.05, 3, False)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb != 0, ext.hash_dropout(x[:4096], 0.05, 3, False) != 0)


@pytest.mark.kernels
def test_hash_dropout_gradient_and_checkpoint_replay():
    """The backward pass drops the same elements (d y / d x = keep / (1 - p)), and activation checkpointing's
    recompute draws the same mask, so a checkpointed step gives the same gradients as a plain one."""
    from torch.utils.checkpoint import checkpoint

    from hybridprune.finetuning.finetune import HashDropout
    torch.manual_seed(0)
    lin, drop = torch.nn.Linear(64, 64), HashDropout(0.3)
    x = torch.randn(8, 64, requires_grad=True)
    y = drop(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, (y != 0).float() * torch.tensor(1 / 0.7, dtype=torch.float32))

    def f(x):
        return lin(drop(torch.tanh(x))).pow(2).sum()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        loss = checkpoint(f, x, use_reentrant=False) if ckpt else f(x)
        grads.append(torch.autograd.grad(loss, (x, lin.weight)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    drop.eval()
    assert torch.equal(drop(x), x)


@pytest.mark.kernels
def test_finetune_with_hash_dropout(samples, tmp_path, monkeypatch):
    """dropout_rng: hash swaps every LoRA dropout for HashDropout; training moves the weights and keeps the zeros;
    the two checkpointing settings give the same trained weights, as with torch's dropout."""
    import hybridprune.finetuning.finetune as ft
    rows = [{"input_ids": s.tolist(), "labels": [-100] * 8 + s.tolist()[8:]} for s in samples]
    monkeypatch.setattr("hybridprune.finetuning.finetune.build_dataset", lambda cfg, tok, cache=None: rows)
    swapped, real = [], ft.use_hash_dropout
    monkeypatch.setattr("hybridprune.finetuning.finetune.use_hash_dropout", lambda m: swapped.append(real(m)) or swapped[-1])
    weights = {}
    for gc in (True, False):
        model = _pruned("llama", "unstructured", samples)
        masks = capture_masks(model)
        cfg = FinetuneConfig(method="lora", steps=3, batch_size=2, lr=1e-2, lora_dropout=0.2, save_steps=100,
                             gradient_checkpointing=gc, dropout_rng="hash")
        out = finetune(model, _Tok(), cfg, tmp_path / f"w{gc}")["model"]
        for name, mod in prunable_matrices(out).items():
            assert torch.equal(mod.weight != 0, masks[name]), name
        weights[gc] = {k: v.detach().clone() for k, v in out.state_dict().items()}
    n_lora = len(prunable_matrices(out))
    assert swapped == [n_lora, n_lora]
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[False])
    with pytest.raises(HybridPruneError, match="dropout_rng"):
        FinetuneConfig(dropout_rng="fast")


def test_finetune_device_and_scheduler_reach_training(monkeypatch, samples, tmp_path):
    import transformers
    real, seen = transformers.Trainer.__init__, {}

    def spy(self, *a, **kw):  # the TrainingArguments the Trainer is given
        args = kw["args"]
        seen.update(use_cpu=args.use_cpu, lr_scheduler_type=getattr(args.lr_scheduler_type, "value",
                                                                    args.lr_scheduler_type))
        return real(self, *a, **kw)
    monkeypatch.setattr(transformers.Trainer, "__init__", spy)
    from hybridprune.finetuning.finetune import finetune
    rows = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in samples]
    monkeypatch.setattr("hybridprune.finetuning.finetune.build_dataset", lambda cfg, tok, cache=None: rows)
    model = tiny_model("llama")
    res = finetune(model, tiny_tokenizer(False), FinetuneConfig(steps=1, batch_size=2, device="cpu"), tmp_path / "w")
    assert seen["use_cpu"] is True and res["record"]["device"] == "cpu"
    assert all(p.device.type == "cpu" for p in res["model"].parameters())
    readme = (Path(__file__).parents[1] / "docs" / "guides" / "finetuning.md").read_text()  # the guide says it
    schedule = seen["lr_scheduler_type"]
    assert f"{schedule} decay" in readme and "linear decay" not in readme.replace(f"{schedule} decay", "")
    assert FinetuneConfig(device="cuda").device == "cuda"  # a config probes no device: checked where it is used
    from hybridprune.io.models import default_device
    if not torch.cuda.is_available():
        with pytest.raises(HybridPruneError, match="no CUDA device"):
            default_device("cuda")


def test_cli_passes_device_and_trust_remote_code_to_finetuning(monkeypatch, tmp_path):
    from hybridprune import cli
    seen = {}

    def fake(spec, config, out, **kw):
        seen.update(kw, device=config.device, bos=config.bos)
        return {"record": {"examples": 1, "first_loss": 1.0, "final_loss": 0.5, "zeros_preserved": 0}}
    monkeypatch.setattr("hybridprune.finetuning.finetune.finetune_and_save", fake)
    assert cli.main(["finetune", "m", "--data", "wikitext2", "--out", str(tmp_path / "o"), "--device", "cpu",
                     "--trust-remote-code", "--bos", "always"]) == 0
    assert seen["device"] == "cpu" and seen["trust_remote_code"] is True and seen["bos"] == "always"


def test_finetune_and_save_loads_with_trust_remote_code(monkeypatch, tmp_path):
    from hybridprune.finetuning import finetune as ft
    seen = {}

    def fake_load(spec, **kw):
        seen.update(kw)
        raise HybridPruneError("stop here")
    monkeypatch.setattr("hybridprune.sparse.load.load_model", fake_load)
    with pytest.raises(HybridPruneError, match="stop here"):
        ft.finetune_and_save("m", FinetuneConfig(), tmp_path / "o", trust_remote_code=True)
    assert seen["trust_remote_code"] is True
