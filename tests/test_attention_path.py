"""The shared attention path: mask reduction, pass-through, and the three intervention slots."""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import TEXT_FAMILIES, attn_names
from nograd.attention import Intervention, intervene, split_mask
from nograd import kernels
from nograd.kernels import causal_visibility
from nograd.patches import adapter_for


def logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kwargs).logits


def attach(model, interventions):
    """A bare handle carrying ``interventions`` (attention module -> Intervention)."""
    handle = nograd.Handle(model, adapter_for(model), "test", None)
    intervene(handle, interventions)
    return handle


# ---- mask reduction -----------------------------------------------------------------------------------------------
def test_split_mask_causal_padding():
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    mask = (causal_visibility(6, 6)[None] & valid[:, None, :])[:, None]
    key_valid, causal, residual = split_mask(mask, 6, 6, True)
    assert torch.equal(key_valid, valid) and causal and residual is None


def test_split_mask_decode_and_no_padding():
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    assert split_mask(mask, 1, 7, True) == (None, True, None)
    assert split_mask(None, 5, 5, True) == (None, True, None)


def test_split_mask_eager_float_and_sliding_window():
    valid = torch.tensor([[False, True, True, True, True]])
    allowed = causal_visibility(5, 5)[None] & valid[:, None, :]
    additive = torch.zeros(1, 1, 5, 5).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    key_valid, causal, residual = split_mask(additive, 5, 5, True)
    assert torch.equal(key_valid, valid) and causal and residual is None
    window = allowed & (torch.arange(5)[None, :] > torch.arange(5)[:, None] - 2)[None]
    key_valid, causal, residual = split_mask(window[:, None], 5, 5, True)
    assert key_valid is None and not causal and residual is not None


# ---- pass-through and equivalence ----------------------------------------------------------------------------------
class ZeroBias(Intervention):
    def key_bias(self, call):
        return torch.zeros(1, 1, call.key.shape[2])


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_inactive_intervention_is_bit_identical(build, padded_batch, family):
    model = build(family)
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    handle = attach(model, {m: Intervention() for m in adapter_for(model).attention_modules})
    assert model.config._attn_implementation.startswith("nograd_")
    assert torch.equal(logits(model, ids, mask), plain)
    handle.remove()


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_zero_bias_through_kernels_equals_base(build, padded_batch, family):
    """Padding, sliding windows (Gemma2) and soft-capping survive the trip through nograd.kernels."""
    model = build(family)
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    with attach(model, {m: ZeroBias() for m in adapter_for(model).attention_modules}):
        got = logits(model, ids, mask)
    torch.testing.assert_close(got[mask.bool()], plain[mask.bool()], atol=1e-5, rtol=0)


class Returns(Intervention):
    """Returns a given key bias or blend, whatever it is."""

    def __init__(self, bias=None, blend=None):
        self.bias, self.blend_weights = bias, blend

    def key_bias(self, call):
        return self.bias(call) if self.bias is not None else None

    def blend(self, call):
        return self.blend_weights(call) if self.blend_weights is not None else None


@pytest.mark.parametrize("returns, words", [
    (dict(bias=lambda call: torch.ones(1, 1, call.shape[3], dtype=torch.bool)), r"a tensor \(bool,"),
    (dict(bias=lambda call: torch.ones(1, 1, call.shape[3], dtype=torch.long)), r"a tensor \(int64,"),
    (dict(bias=lambda call: torch.zeros(1, 1, call.shape[3] + 1)), r"shape \(1, 1, \d+\)\)"),
    (dict(bias=lambda call: torch.zeros(call.shape[0], 1, 1, call.shape[3])), r"shape \(2, 1, 1, \d+\)\)"),
    (dict(bias=lambda call: 1.0), "a float;"),
    (dict(blend=lambda call: 0.5), "a float;"),
    (dict(blend=lambda call: torch.full((call.shape[1],), 2.0)), r"in \[0, 1\]"),
    (dict(blend=lambda call: torch.full((call.shape[1],), float("nan"))), r"in \[0, 1\]"),
])
def test_what_an_intervention_returns_is_checked_alone_and_named(build, padded_batch, returns, words):
    """A key bias was checked only after the padding bias was added to it: on a padded batch a bool mask became +1
    logits, an int bias passed, a wrong shape raised torch's own broadcast error (or named the sum's shape). Each
    return is checked as it comes, with the intervention's name; the model is plain again after the handle goes."""
    model = build("llama")
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    with attach(model, {m: Returns(**returns) for m in adapter_for(model).attention_modules}):
        with pytest.raises(ValueError, match=f"^Returns.(key_bias|blend) returned .*{words}"):
            logits(model, ids, mask)
    assert torch.equal(logits(model, ids, mask), plain)


# ---- read-out ----------------------------------------------------------------------------------------------------
class Recorder(Intervention):
    observes = True

    def __init__(self):
        self.rows, self.mass = [], []

    def observe(self, call):
        _, _, m, _ = call.shape
        self.rows.append(call.attention_rows(torch.tensor([m - 1])))
        self.mass.append(call.key_mass())


def test_readout_equals_eager_attention_weights(build, padded_batch):
    model = build("llama", attn_implementation="eager")
    ids, mask = padded_batch
    with torch.no_grad():
        weights = model(ids, attention_mask=mask, output_attentions=True).attentions
    recorder = Recorder()
    with attach(model, {adapter_for(model).attention_modules[1]: recorder}):
        logits(model, ids, mask)
    torch.testing.assert_close(recorder.rows[0][:, :, 0], weights[1][:, :, -1], atol=1e-6, rtol=0)
    real = mask.bool()[:, None, :, None]  # pad queries attend nowhere in our path
    torch.testing.assert_close(recorder.mass[0], (weights[1] * real).sum(2), atol=1e-5, rtol=0)


class PlantedSink(Recorder):
    def key_bias(self, call):
        bias = torch.zeros(1, call.query.shape[1], call.key.shape[2])
        bias[0, 2, 6] = 30.0  # head 2 must put (almost) all its mass on key 6
        return bias


def test_readout_recovers_planted_sink(build, padded_batch):
    model = build("qwen2")
    ids, mask = padded_batch
    planted = PlantedSink()
    with attach(model, {adapter_for(model).attention_modules[0]: planted}):
        logits(model, ids, mask)
    rows, mass = planted.rows[0], planted.mass[0]
    assert int(rows[0, 2, 0].argmax()) == 6 and rows[0, 2, 0, 6] > 0.999
    assert mass[:, 2].argmax(-1).tolist() == [6, 6]
    assert mass[:, [0, 1, 3]].argmax(-1).ne(6).any()


# ---- blend -------------------------------------------------------------------------------------------------------
class FullBlend(Intervention):
    def __init__(self, heads):
        self.heads = heads

    def blend(self, call):
        u = torch.zeros(call.query.shape[1])
        u[self.heads] = 1.0
        return u


def test_blend_one_gives_the_value_of_each_token(build, padded_batch):
    model = build("llama")
    ids, mask = padded_batch
    module = adapter_for(model).attention_modules[1]
    seen = {}
    value_hook = module.v_proj.register_forward_hook(lambda mod, args, out: seen.__setitem__("v", out))
    o_hook = module.o_proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("o", args[0]))
    with attach(model, {module: FullBlend([0, 1, 2, 3])}):
        logits(model, ids, mask)
    value_hook.remove(), o_hook.remove()
    b, s, _ = seen["o"].shape
    values = seen["v"].view(b, s, 2, 16).repeat_interleave(2, dim=2).reshape(b, s, 64)
    assert torch.equal(seen["o"], values)


def test_split_mask_flash_padding_vector():
    valid = torch.tensor([[0, 1, 1], [1, 1, 1]])
    key_valid, causal, residual = split_mask(valid, 3, 3, True)
    assert torch.equal(key_valid, valid.bool()) and causal and residual is None
    assert split_mask(torch.ones(2, 3, dtype=torch.long), 3, 3, True) == (None, True, None)


def test_sliding_window_kwarg_reaches_the_kernels(build):
    """Mistral with a window shorter than the prompt: a zero bias through our path equals the base model."""
    model = build("mistral", sliding_window=4)
    ids = torch.randint(4, 128, (2, 10))
    plain = logits(model, ids)
    with attach(model, {m: ZeroBias() for m in adapter_for(model).attention_modules}):
        torch.testing.assert_close(logits(model, ids), plain, atol=1e-5, rtol=0)


class HeadEdit(Intervention):
    """A score edit on heads 1 and 3 of every row (``rows_from=None``)."""

    def score_edit(self, call):
        coef = torch.zeros(1, call.query.shape[1], call.key.shape[2])
        coef[0, [1, 3]] = 0.5
        return kernels.ScoreEdit(abs_coef=coef)


def test_edited_rows_over_the_base_equal_the_fused_path(build, padded_batch, monkeypatch):
    from nograd import attention

    model = build("llama")
    ids, mask = padded_batch
    with attach(model, {m: HeadEdit() for m in adapter_for(model).attention_modules}):
        over_base = logits(model, ids, mask)
        monkeypatch.setattr(attention, "EDITED_ROWS_OVER_BASE", 0)
        fused = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(over_base[real], fused[real], atol=1e-5, rtol=0)
    assert (over_base - logits(model, ids, mask))[real].abs().max() > 1e-4


class AllHeadsEdit(Intervention):
    """A score edit on every head of every row, which says so."""

    def score_edit(self, call):
        return kernels.ScoreEdit(abs_coef=torch.full((1, 1, call.key.shape[2]), 0.5), every_head_from=0)


@pytest.mark.parametrize("edit, base_runs", [(AllHeadsEdit, 0), (HeadEdit, 1)])
def test_a_decode_step_edited_everywhere_skips_the_base(edit, base_runs):
    """A decode row whose every head is edited is the edited row alone (the reference's, exactly): the caller's
    attention is not run for nothing; with an unedited head it runs and that head keeps the caller's output."""
    from nograd import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    runs = []

    def base():
        runs.append(1)
        return kernels.attention(q, k, v, backend="sdpa")

    call = attention.AttentionCall(module=None, layer_idx=0, query=q, key=k, value=v, scaling=8 ** -0.5,
                                   batch=attention.BatchInfo())
    out = attention.attend(call, [edit()], None, base=base)
    want = kernels.attention(q, k, v, edit=call.edit, backend="eager")
    assert len(runs) == base_runs
    if base_runs:
        assert torch.equal(out[:, [0, 2]], base()[:, [0, 2]]) and torch.equal(out[:, [1, 3]], want[:, [1, 3]])
    else:
        assert torch.equal(out, want)


@pytest.mark.parametrize("family, switch", [("llama", "eager"), ("llava", {"text_config": "eager"})])
def test_an_implementation_set_after_apply_raises_and_stays(build, family, switch):
    """``set_attn_implementation`` after ``apply`` would switch the method off unseen: the next forward raises, and
    ``remove()`` keeps the user's implementation (and unregisters nograd's names) instead of restoring the old one."""
    model = build(family)
    ids = torch.randint(4, 100, (1, 9))
    with nograd.apply(model, "zerotuning", gamma=2.0):
        model.set_attn_implementation(switch)
        user = attn_names(model)
        with pytest.raises(RuntimeError, match=r"was set to 'eager' after nograd\.apply"):
            logits(model, ids)
    assert attn_names(model) == user and nograd.attention.registered_names() == []
    plain = logits(model, ids)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits(model, ids), plain, atol=1e-5, rtol=0)  # eager as the user set it, unsteered


@pytest.mark.parametrize("method, options", [("zerotuning", dict(gamma=3.0)), ("act", dict(beta=0.4)),
                                             ("pai", dict(alpha=5.0, layers=(0, None)))])
def test_autocast_runs_the_edited_attention_in_the_autocast_dtype(method, options):
    """Under torch.autocast(bfloat16) RoPE's fp32 cos / sin leave q and k in fp32 beside a bf16 v; the model's own
    attention (eager's matmuls, SDPA) runs them in bf16, and so do the edits now (they raised: mixed dtypes). The
    result is the fp32 method's within bf16 rounding, closer than the plain model is."""
    if method == "pai":
        model, _ = nograd.tiny.vlm("llava", layers=2)
        inputs = nograd.tiny.vlms.make_inputs("llava", model, batch=2)
    else:
        model = nograd.tiny.llm(layers=2)[0]
        ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0, 1]), 0))

    def run():
        with torch.no_grad():
            return model(**inputs).logits

    with nograd.apply(model, method, **options):
        edited = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = run()
    assert autocast.dtype == torch.bfloat16
    error, effect = (autocast.float() - edited).abs().max(), (run() - edited).abs().max()
    assert error < 2e-2 and effect > 2 * error


@pytest.mark.slow  # compiles the model (about 30 s on two cores)
def test_token_dropping_attached_after_a_compiled_call_is_not_skipped():
    """torch.compile does not guard a compiled graph on module hooks added later: token dropping, which acts through
    hooks alone, ran the stale plain graph when attached after a compiled call (the plain model's logits, empty
    stats). It switches the attention implementation name too (attention as before), which the graph is guarded on."""
    model, _ = nograd.tiny.vlm("llava", layers=3)
    inputs = nograd.tiny.vlms.make_inputs("llava", model, batch=2)
    torch.compiler.reset()
    with torch.no_grad():
        plain = model(**inputs).logits
        with nograd.apply(model, "fastv"):
            expected = model(**inputs).logits
        model.forward = torch.compile(model.forward, backend="eager")
        model(**inputs)
        with nograd.apply(model, "fastv") as handle:
            torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-6, rtol=0)
            assert handle.stats["stage_lengths"][-1] < inputs["input_ids"].shape[1]
        torch.testing.assert_close(model(**inputs).logits, plain, atol=1e-6, rtol=0)
    del model.forward
    torch.compiler.reset()


@pytest.mark.slow  # compiles the model (about 12 s on two cores)
def test_torch_compile_runs_each_layers_own_interventions():
    """``torch.compile`` of a model with a method attached gives the eager model's logits and generation: traced,
    the lookup of a layer's interventions was specialised to the first layer's (layer 1 ran layer 0's ACT sinks)."""
    ids = torch.tensor([[1, 5, 9, 23, 44, 7, 8, 60, 33, 12]])
    longer = torch.cat([ids, torch.tensor([[4, 4]])], dim=1)
    greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)

    def session(compiled: bool):
        model, _ = nograd.tiny.llm(layers=2)
        with nograd.apply(model, "act", beta=0.4, threshold=0.05) as handle, torch.no_grad():
            if compiled:
                model.forward = torch.compile(model.forward, backend="eager")
            return (model(ids).logits, model(longer).logits, torch.stack(model.generate(ids, **greedy).logits),
                    dict(handle.stats))

    torch.compiler.reset()  # no compiled code or recompile count left from an earlier test
    expected, got = session(False), session(True)
    for g, e in zip(got[:3], expected[:3]):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)
    assert got[3]["sinks"] == expected[3]["sinks"]


def test_a_forward_inside_the_models_own_forward_keeps_the_outer_calls_padding():
    """A longer prompt run by a hook inside the model's forward: the outer call still finds its own first real token
    and length (the inner forward's batch state was left behind: the outer call's key offset moved off key 0)."""
    model, _ = nograd.tiny.llm(layers=2)
    short, long = torch.tensor([[1, 5, 9]]), torch.tensor([[1, 5, 9, 23, 44, 7, 8, 60, 33, 12]])
    with nograd.apply(model, "zerotuning", gamma=3.0), torch.no_grad():
        expected_short, expected_long = model(short).logits, model(long).logits
        inner = []

        def run_long_once(module, args, output):
            if not inner:
                inner.append(None)
                inner[0] = model(long).logits

        hook = model.model.layers[0].register_forward_hook(run_long_once)
        try:
            outer = model(short).logits
        finally:
            hook.remove()
    assert torch.equal(outer, expected_short) and torch.equal(inner[0], expected_long)


@pytest.mark.parametrize("method, options", [("zerotuning", dict(gamma=3.0)), ("act", dict(threshold=0.05))])
@pytest.mark.parametrize("between", ["second loss", "evaluation"])
def test_a_checkpointed_recomputation_finds_its_own_forwards_padding(method, options, between):
    """Gradient checkpointing recomputes the layers in the backward, after other forwards: two losses summed before
    one backward, or an evaluation forward in between, with other padding. The recomputation reads the padding of
    its own forward (it read the last forward's: ZeroTuning's gradients 0.72 off), so the gradients are the plain
    backward's."""
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(4, 100, (2, 9), generator=g), torch.randint(4, 100, (2, 7), generator=g)
    first_mask, second_mask = torch.ones_like(first), torch.ones_like(second)
    first_mask[1, :3], second_mask[0, :2] = 0, 0

    def gradients(checkpointing: bool):
        model, _ = nograd.tiny.llm(layers=2)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        with nograd.apply(model, method, **options):
            loss = model(first, attention_mask=first_mask, use_cache=False).logits[:, -1].square().mean()
            if between == "second loss":
                loss = loss + model(second, attention_mask=second_mask, use_cache=False).logits[:, -1].square().mean()
            else:
                with torch.no_grad():
                    model(second, attention_mask=second_mask, use_cache=False)
            loss.backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    plain = gradients(False)
    checkpointed = gradients(True)
    assert len(checkpointed) == len(plain) > 0
    for grad, want in zip(checkpointed, plain):
        torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5)


def test_a_reused_mask_buffer_after_a_checkpointed_backward_is_split_afresh():
    """Gradient checkpointing recomputes the layers in the backward, after their forward ended, and splits the mask
    again there: the next forward, given the same 4-D mask buffer rewritten in place (packed sequences), must not find
    that split (0.375 off)."""
    ids = torch.randint(4, 120, (1, 10), generator=torch.Generator().manual_seed(0))

    def packed(cut):  # two causal blocks, [0, cut) and [cut, 10)
        allowed = torch.ones(10, 10, dtype=torch.bool).tril()
        allowed[cut:, :cut] = False
        return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]

    model, _ = nograd.tiny.llm(layers=2)
    model.gradient_checkpointing_enable()
    model.train()
    with nograd.apply(model, "zerotuning", gamma=2.0):
        buffer = packed(4)
        model(ids, attention_mask=buffer, labels=ids).loss.backward()
        buffer.copy_(packed(7))
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=buffer).logits, model(ids, attention_mask=packed(7)).logits)
