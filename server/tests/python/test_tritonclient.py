"""sluice through Python `tritonclient[grpc]`, used as a Triton user would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[3]
REFERENCE = ROOT / "models" / ".reference"


@pytest.fixture(scope="module")
def client(sluice):
    c = grpcclient.InferenceServerClient(sluice.grpc_url)
    yield c
    c.close()


def reference(model: str) -> tuple[np.ndarray, np.ndarray]:
    meta = json.loads((REFERENCE / f"{model}.json").read_text())
    x = np.fromfile(REFERENCE / f"{model}.input.bin", dtype="<f4").reshape(meta["input"]["shape"])
    y = np.fromfile(REFERENCE / f"{model}.output.bin", dtype="<f4").reshape(meta["output"]["shape"])
    return x, y


def infer(client, model: str, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x))
    out = grpcclient.InferRequestedOutput("OUTPUT__0")
    return client.infer(model, [inp], outputs=[out]).as_numpy("OUTPUT__0")


def test_server_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "sluice"
    assert "model_repository" in meta["extensions"]


@pytest.mark.parametrize("model,dims", [("mlp", [64]), ("cnn", [3, 64, 64])])
def test_model_ready_metadata_and_config(client, model, dims):
    assert client.is_model_ready(model)
    meta = client.get_model_metadata(model, as_json=True)
    assert meta["name"] == model
    assert meta["platform"] == "pytorch_libtorch"
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": [str(d) for d in [-1, *dims]]}]
    assert meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = client.get_model_config(model, as_json=True)["config"]
    assert config["name"] == model
    assert config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == [str(d) for d in dims]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_inference_matches_pytorch(client, model):
    x, expected = reference(model)
    batch8 = infer(client, model, x)
    assert batch8.shape == expected.shape == (8, 10)
    np.testing.assert_allclose(batch8, expected, rtol=0, atol=1e-5)
    for i in (0, 5):
        one = infer(client, model, x[i : i + 1])
        assert one.shape == (1, 10)
        np.testing.assert_allclose(one[0], expected[i], rtol=0, atol=1e-5)


def test_reference_is_what_pytorch_computes(client):
    # The stored reference itself agrees with a fresh forward of the exported module.
    x, expected = reference("mlp")
    module = torch.jit.load(str(ROOT / "models" / "mlp" / "1" / "model.pt"))
    with torch.no_grad():
        fresh = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(fresh, expected, rtol=0, atol=1e-6)


def test_statistics_count_inferences(client):
    x, _ = reference("mlp")
    before = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    infer(client, "mlp", x[:3])
    after = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    assert int(after.get("inference_count", 0)) == int(before.get("inference_count", 0)) + 3
    assert int(after.get("execution_count", 0)) == int(before.get("execution_count", 0)) + 1
    assert int(after["inference_stats"]["success"]["count"]) >= 1
    assert any(int(b["batch_size"]) == 3 for b in after["batch_stats"])


def test_errors_reach_the_client(client):
    with pytest.raises(InferenceServerException) as e:
        infer(client, "mlp", np.zeros((1, 63), dtype=np.float32))
    assert "StatusCode.INVALID_ARGUMENT" in str(e.value.status())
    assert "[-1, 64]" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert "StatusCode.NOT_FOUND" in str(e.value.status())
    # and the server still serves
    x, expected = reference("mlp")
    np.testing.assert_allclose(infer(client, "mlp", x), expected, rtol=0, atol=1e-5)


def test_repository_index(client):
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["state"]) for m in index} == {("mlp", "READY"), ("cnn", "READY")}
