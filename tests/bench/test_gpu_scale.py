"""``bench.gpu_scale`` in its CPU smoke mode: the script a GPU session runs, on a two-layer Llama of
the 8B layout, in bfloat16 and NF4 (bitsandbytes' CPU kernels)."""

import json

import pytest

pytest.importorskip("bitsandbytes")


def test_gpu_scale_smoke_measures_both_bases(tmp_path):
    from bench.gpu_scale import main

    out = tmp_path / "gpu_scale.json"
    result = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    bf16, nf4 = result["runs"]
    assert (bf16["base"], nf4["base"]) == ("bfloat16", "nf4")
    assert nf4["model_bytes"] < bf16["model_bytes"]  # the decoder's linear layers really are 4-bit
    for run in result["runs"]:
        assert run["blob_over_lora_time"]["rounds"] == 2 and run["blob_over_lora_time"]["median"] > 0
        assert min(run["peak_bytes"].values()) > 0 and run["kfac_over_floor"] > 0
