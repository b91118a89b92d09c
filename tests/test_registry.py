"""Every plugin registry refuses a name registered twice and answers an unknown name with the closest."""

from __future__ import annotations

import pytest

from tasks.errors import UserError
from tasks.export import ExportError, ExportFormat, get_format, register_format
from tasks.recover import RecoveryError, get_recovery
from tasks.registry import DuplicateRegistration, Registry, UnknownName
from tasks.score import METRICS, Metric, register_metric
from tasks.search import STRATEGIES, register_strategy
from tasks.surgery import UnsupportedArchitecture, architecture_for, register_architecture
from tasks.surgery.llama import LlamaFamilyAdapter


def test_registry_refuses_a_second_definition_under_one_name():
    registry: Registry[object] = Registry("widget")

    class First:
        pass

    class Second:
        pass

    registry.add("w", First())
    registry.add("w", First())  # the same definition again (a reload) is not a clash
    with pytest.raises(DuplicateRegistration, match=r"widget 'w' is registered twice: .*First and .*Second"):
        registry.add("w", Second())
    assert isinstance(registry["w"], First) and registry.names() == ["w"]


def test_unknown_name_gets_the_closest_and_every_known_one():
    registry: Registry[int] = Registry("widget")
    for name, value in (("alpha", 1), ("beta", 2)):
        registry.add(name, value)
    with pytest.raises(UnknownName, match=r"unknown widget 'alpah' \(did you mean 'alpha'\?\); known: alpha, beta"):
        registry.lookup("alpah")
    with pytest.raises(UnknownName) as error:
        registry.lookup("zzz")
    assert "did you mean" not in str(error.value)
    assert isinstance(error.value, UserError)  # the command line turns it into exit 2
    assert dict(registry.items()) == {"alpha": 1, "beta": 2} and "beta" in registry and len(registry) == 2


def test_the_project_registries_refuse_duplicates():
    class Impostor(Metric):
        name = "perplexity"
        remove = "lowest"

    with pytest.raises(DuplicateRegistration, match="metric 'perplexity'"):
        register_metric(Impostor)
    with pytest.raises(DuplicateRegistration, match="strategy 'iterative'"):
        register_strategy("iterative")(lambda ctx: [])

    class OtherHf(ExportFormat):
        name = "hf"

    with pytest.raises(DuplicateRegistration, match="export format 'hf'"):
        register_format(OtherHf)

    class OtherLlama(LlamaFamilyAdapter):
        model_types = ("llama",)

    with pytest.raises(DuplicateRegistration, match="model_type 'llama'"):
        register_architecture(OtherLlama)
    assert type(METRICS["perplexity"]).__name__ != "Impostor" and STRATEGIES["iterative"].__name__ != "<lambda>"
    assert type(architecture_for("llama")) is LlamaFamilyAdapter


def test_the_project_registries_answer_unknown_names_with_their_own_errors():
    with pytest.raises(UnknownName, match="did you mean 'perplexity'"):
        METRICS.lookup("perplexty")
    with pytest.raises(RecoveryError, match=r"unknown recovery method 'lora2' \(did you mean 'lora'\?\)"):
        get_recovery("lora2")
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        get_format("onnx")
    with pytest.raises(UnsupportedArchitecture, match="did you mean 'llama'"):
        architecture_for("lama")
