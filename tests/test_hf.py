"""Hugging Face end to end on the module form: cache, labels, padding, generate, save_pretrained /
sg.from_pretrained, Trainer with dynamic sparsity and SμPar learning rates."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
import sparsegraph as sg  # noqa: E402
from sparsegraph.io import LoadError  # noqa: E402

V = 128


def gpt2(**kw):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=V, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert():
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  vocab_size=V, max_position_embeddings=64, pad_token_id=0)
    return transformers.BertForMaskedLM(cfg).eval()


def t5():
    cfg = transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=1, num_heads=4, vocab_size=V,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def ids(shape=(2, 8), seed=0):
    return torch.randint(2, V, shape, generator=torch.Generator().manual_seed(seed))


def rewrite(build, transform, supar, **kw):
    torch.manual_seed(0)
    dense = build()
    x = ids()
    inputs = (x, None, x) if build is t5 else (x,)  # T5: input_ids, attention_mask, decoder_input_ids
    model = sg.sparsify(dense, inputs, transform, 0.5, **kw)
    if supar:
        model = sg.supar.annotate(model)
    return model.eval()


CASES = {  # (builder, transform, SμPar)
    "gpt2-wide": (gpt2, "sparse_wide", False),
    "gpt2-wide-supar": (gpt2, "sparse_wide", True),
    "gpt2-parallel-supar": (gpt2, "sparse_parallel", True),
    "llama-factorized-supar": (llama, "sparse_factorized", True),  # GQA: 2 key/value heads for 4 heads
    "t5-wide-supar": (t5, "sparse_wide", True),
}
_cache: dict = {}


def case(name):
    if name not in _cache:
        _cache[name] = rewrite(*CASES[name])
    return _cache[name]


DECODERS = [k for k in CASES if not k.startswith("t5")]


# -- 1. capture turns the KV cache off --------------------------------------------------------
def test_capture_with_default_use_cache():
    dense = gpt2()
    assert dense.config.use_cache is True  # the Hugging Face default
    x = ids()
    assert sg.analyze(dense, (x,)).dense_flops > 0
    model = sg.sparsify(dense, (x,), "sparse_wide", 0.5)
    assert dense.config.use_cache is True and model.config.use_cache is True  # the user's setting restored
    assert model.config.n_embd == sg.plan_of(model).weight("transformer.wte.weight").shape[1] > 64
    out = model(x)
    assert out.past_key_values is not None  # the rewritten model still caches


# -- 2. the config carries the plan -------------------------------------------------------------
def test_config_carries_plan_and_follows_annotate():
    model = copy.deepcopy(case("gpt2-wide"))
    assert model.config.sparsegraph["plan"] == sg.plan_of(model).to_dict()
    assert "parameterization" not in model.config.sparsegraph["plan"]["supar"]
    sg.supar.annotate(model)
    assert model.config.sparsegraph["plan"]["supar"]["parameterization"] == "supar"
    assert model.config.sparsegraph["plan"] == sg.plan_of(model).to_dict()
    json.loads(model.config.to_json_string())  # JSON-able as save_pretrained writes it


# -- 4. labels, padding, generate -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_labels_give_the_loss(name):
    model = case(name)
    x = ids(seed=1)
    if name.startswith("t5"):
        y = ids(seed=2)
        out = model(input_ids=x, labels=y)
        want = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))
    else:
        out = model(input_ids=x, labels=x)
        want = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DECODERS)
def test_left_padding_matches_unpadded(name):
    model = case(name)
    x = ids((1, 6), seed=3)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)  # 3 pad tokens on the left
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(input_ids=padded, attention_mask=mask, position_ids=pos).logits[:, 3:]
        want = model(input_ids=x).logits
        unmasked = model(input_ids=padded, position_ids=pos).logits[:, 3:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked, want, rtol=1e-4, atol=1e-5)  # the mask is what makes them equal


def test_bert_masked_lm_labels_and_right_padding():
    torch.manual_seed(0)
    x = ids()
    model = sg.sparsify(bert(), (x,), "sparse_wide", 0.5).eval()
    labels = torch.full_like(x, -100)
    labels[:, 2] = x[:, 2]
    out = model(input_ids=x, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, 2], x[:, 2]), rtol=1e-5, atol=1e-6)
    short = ids((1, 5), seed=4)
    padded = torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = (torch.arange(8) < 5).long()[None]
    with torch.no_grad():
        got = model(input_ids=padded, attention_mask=mask).logits[:, :5]
        want = model(input_ids=short).logits
        unmasked = model(input_ids=padded).logits[:, :5]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked, want, rtol=1e-4, atol=1e-5)


def greedy_no_cache(model, x, n, encoder_decoder=False):
    """Greedy decoding by full forwards, no cache: the reference for generate."""
    seq = torch.full((x.shape[0], 1), model.config.decoder_start_token_id) if encoder_decoder else x
    with torch.no_grad():
        for _ in range(n):
            kw = {"input_ids": x, "decoder_input_ids": seq} if encoder_decoder else {"input_ids": seq}
            logits = model(**kw, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("name", list(CASES))
def test_generate_with_cache_equals_greedy_without(name):
    model = case(name)
    encdec = name.startswith("t5")
    x = ids((2, 5), seed=5)
    with torch.no_grad():
        got = model.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
    want = greedy_no_cache(model, x, 8, encdec)
    assert got.shape[1] == want.shape[1]
    assert torch.equal(got, want)


# -- 3. save_pretrained -> sg.from_pretrained --------------------------------------------------------
@pytest.mark.parametrize("name,shard", [("gpt2-wide-supar", None), ("llama-factorized-supar", "60KB"),
                                        ("t5-wide-supar", None)])
def test_save_pretrained_round_trip(tmp_path, name, shard):
    model = case(name)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kw)
    if shard:
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    back = sg.from_pretrained(tmp_path)
    assert type(back) is type(model)
    assert sg.plan_of(back).to_dict() == sg.plan_of(model).to_dict()
    masks = {k: v for k, v in model.state_dict().items() if k.endswith("_mask")}
    assert masks and all(torch.equal(back.state_dict()[k], v) for k, v in masks.items())
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(back.state_dict()[k], v), k
    x = ids((2, 6), seed=6)
    kw = {"decoder_input_ids": x} if name.startswith("t5") else {}
    with torch.no_grad():
        assert torch.equal(back(input_ids=x, **kw).logits, model(input_ids=x, **kw).logits)
    # SμPar forward multipliers are back: the same model without them gives other outputs
    from sparsegraph.passes.supar_module import forward_sites
    assert forward_sites(back) == forward_sites(model) != []


def test_from_pretrained_refuses_a_folder_without_plan(tmp_path):
    gpt2().save_pretrained(tmp_path)
    with pytest.raises(LoadError, match="config.json has no sparsegraph plan"):
        sg.from_pretrained(tmp_path)
    with pytest.raises(LoadError, match="not a folder"):
        sg.from_pretrained(tmp_path / "nothing")


def test_from_pretrained_refuses_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    model = case("gpt2-wide")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = next(k for k in state if k.endswith("_mask"))
    del state[key]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match=f"the files have no {key}"):
        sg.from_pretrained(tmp_path)


# -- 5. Trainer with the callback and SμPar learning rates ------------------------------------------
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=20):
        self.x = ids((n, 8), seed=7)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def test_trainer_rigl_sparseopt_supar(tmp_path):
    from sparsegraph.integrations.hf import SparsegraphCallback, sparsegraph_optimizer

    torch.manual_seed(0)
    model = sg.supar.annotate(sg.sparsify(gpt2(), (ids(),), "sparse_wide", 0.75, width=2.0))
    model = sg.supar.init_(model).train()
    masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}
    args = transformers.TrainingArguments(str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                                          learning_rate=1e-2, weight_decay=0.1, use_cpu=True, report_to=[],
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                          dataloader_num_workers=0, seed=0)
    opt, sched = sparsegraph_optimizer(model, args, sparseopt=True)
    callback = SparsegraphCallback("rigl", update_interval=2, drop_fraction=0.3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched),
                                   callbacks=[callback])
    trainer.train()
    from sparsegraph.integrations.hf import _inner_optimizer
    assert isinstance(_inner_optimizer(trainer.optimizer), sg.SparseOpt)
    # SμPar learning rates in the Trainer's optimizer: hidden weights at lr / (m_d 2 * m_rho 0.25), and
    # the base lr elsewhere, read back through the plan
    plan = sg.plan_of(model)
    want = {w.name: 1e-2 * w.supar["lr"]["adamw"][0] / w.supar["lr"]["adamw"][1] for w in plan.weights}
    seen = {}
    for g in trainer.optimizer.param_groups:
        for n in g["names"]:
            seen[n] = g["initial_lr"] if "initial_lr" in g else g["lr"]
    assert seen.keys() >= want.keys() and all(seen[n] == pytest.approx(want[n]) for n in want)
    assert len({round(v, 12) for v in want.values()}) > 1  # more than one learning rate: SμPar at work
    # RigL updated inside the 5 steps, kept every layer's density, and masked weights are exactly zero
    assert [h["step"] for h in plan.history] == [2]
    assert model.config.sparsegraph["plan"]["history"] == plan.history  # the config follows DST updates
    state = model.state_dict()
    changed = False
    for k, m in masks.items():
        new = state[k]
        assert int(new.count_nonzero()) == int(m.count_nonzero())
        changed |= not torch.equal(new, m)
        w = state[k.removesuffix("_mask")]
        assert torch.all(w[new == 0] == 0)
    assert changed
