"""Device and precision choice of the load stage: `model.dtype: auto`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.loader import load_spec
from tasks.load import open_model, resolve_dtype
from tests.flowkit import tiny_pipeline


def test_auto_dtype_is_float32_on_cpu_and_explicit_dtypes_pass_through():
    assert resolve_dtype("auto", "cpu") == "float32"
    for dtype in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(dtype, "cpu") == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_dtype_is_bfloat16_on_a_cuda_device_that_supports_it():
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert resolve_dtype("auto", "cuda") == expected


def test_pipeline_with_auto_dtype_opens_the_model_in_float32_on_cpu(tmp_path: Path):
    spec = load_spec(tiny_pipeline(tmp_path, model={"dtype": "auto", "device": "cpu"}))
    model = open_model(spec.model.source, spec.model, "test")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
