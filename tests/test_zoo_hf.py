"""normkit on transformers models built from tiny configs (no download): a BERT encoder with a classification
head, GPT-2 (transformers' ``Conv1D`` layers, LM head tied to the token embedding) and Llama (RMSNorm,
grouped-query attention, SwiGLU). Optional group: skipped without ``transformers`` (in the dev extra, so CI
runs it).

What a user relies on, measured outside the code under test (helpers in ``tests/test_zoo.py``): LSUV's report
against forward hooks on the real forward, every linear map initialized or named in a warning; parameter
groups against the function (×3 on each selected weight); ENorm against the function; one step of each
optimizer leaves the model finite.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")
import transformers

from normkit.init import LayerStatus
from normkit.optim import grassmann_param_groups, scale_invariant_param_groups
from tests.test_zoo import (
    enorm_function_change,
    lsuv_findings,
    not_scale_invariant,
    one_step_each_optimizer,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB, SEQ = 64, 8


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


MODELS: dict[str, Callable[[], nn.Module]] = {"bert": bert, "gpt2": gpt2, "llama": llama}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    return model, torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def linear_maps(model: nn.Module) -> list[str]:
    """Modules that are a linear map of their input by a weight matrix: ``nn.Linear`` and transformers'
    ``Conv1D`` (GPT-2's, weight stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


# --- LSUV ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "bert",
        "gpt2",  # its LM head shares the token embedding's weight: kept, measured and named in a warning
        "llama",
    ],
)
def test_lsuv_report_is_what_hooks_measure_and_every_linear_map_is_covered(name: str) -> None:
    model, ids = make(name)
    found = lsuv_findings(model, ids)
    report = found["report"]
    statuses = {r.name: r.status for r in report}
    uncovered = [
        n
        for n in linear_maps(model)
        if statuses.get(n)
        not in (LayerStatus.INITIALIZED, LayerStatus.FEEDS_NORMALIZATION, LayerStatus.SHARED)
    ]
    problems = {
        k: found[k] for k in ("var_wrong", "not_converged", "silent", "norm_as_unsupported", "untouched")
    }
    problems["linear maps not initialized"] = uncovered
    assert not any(problems.values()), problems
    assert report.initialized, "LSUV initialized nothing"


# --- parameter groups: only really scale-invariant weights --------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_param_groups_select_only_scale_invariant_weights(name: str) -> None:
    model, ids = make(name)
    groups = grassmann_param_groups(model, 0.01, 0.05, example_input=ids, unit_init=False)
    grassmann = [p for g in groups if g["grassmann"] for p in g["params"]]
    assert not_scale_invariant(model, ids, grassmann, per_row=True) == []
    groups = scale_invariant_param_groups(model, example_input=ids)
    rows = [p for g in groups if g["projection"] == "row" for p in g["params"]]
    tensors = [p for g in groups if g["projection"] == "tensor" for p in g["params"]]
    assert not_scale_invariant(model, ids, rows, per_row=True) == []
    assert not_scale_invariant(model, ids, tensors, per_row=False) == []
    # every parameter is in exactly one group: nothing dropped, nothing twice
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted({id(p) for p in model.parameters()})


# --- ENorm --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_enorm_keeps_the_function_or_says_what_failed(name: str) -> None:
    model, ids = make(name)
    try:
        change, enorm, _ = enorm_function_change(model, ids)
    except RuntimeError as exc:
        message = str(exc)
        assert "control flow" not in message, message  # not the cause here
        assert "example_input" in message or "hook" in message, message  # the way forward
        return
    assert change <= 1e-10, change
    assert all(reason for _, reason in enorm.skipped)


# --- one step of each optimizer -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_one_step_of_each_optimizer_keeps_the_model_finite(name: str) -> None:
    model, ids = make(name)
    results = one_step_each_optimizer(model, ids, example_input=ids)
    assert all(finite for finite, _ in results.values()), results
    assert all(moved > 0 for _, moved in results.values()), results
