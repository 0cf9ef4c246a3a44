"""sluice through Python `tritonclient[http]` (the KServe v2 REST protocol), as a Triton
user would call it, checked against the gRPC answers for the same requests."""

from __future__ import annotations

import json
import socket
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import CONTROL_TOKEN
from test_tritonclient import reference


@pytest.fixture(scope="module")
def client(sluice):
    c = httpclient.InferenceServerClient(sluice.http_url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc(sluice):
    c = grpcclient.InferenceServerClient(sluice.grpc_url)
    yield c
    c.close()


def http_infer(client, model, x, binary_input=True, binary_output=True):
    inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x), binary_data=binary_input)
    out = httpclient.InferRequestedOutput("OUTPUT__0", binary_data=binary_output)
    return client.infer(model, [inp], outputs=[out], request_id="r-7")


def grpc_infer(grpc, model, x):
    inp = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x))
    return grpc.infer(model, [inp]).as_numpy("OUTPUT__0")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("binary_input,binary_output", [(True, True), (False, False), (False, True), (True, False)])
def test_inference_equals_grpc(client, grpc, model, binary_input, binary_output):
    x, expected = reference(model)
    result = http_infer(client, model, x, binary_input, binary_output)
    got = result.as_numpy("OUTPUT__0")
    assert got.shape == (8, 10) and got.dtype == np.float32
    np.testing.assert_array_equal(got, grpc_infer(grpc, model, x))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    response = result.get_response()
    assert response["model_name"] == model and response["model_version"] == "1"
    assert response["id"] == "r-7"


def test_default_outputs_come_as_binary(client):
    x, expected = reference("mlp")
    inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("mlp", [inp])  # no outputs named: every output, binary
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected, rtol=0, atol=1e-5)
    assert result.get_output("OUTPUT__0")["parameters"]["binary_data_size"] == 8 * 10 * 4


def test_health_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "sluice"
    assert client.is_model_ready("mlp") and client.is_model_ready("cnn", "1")
    assert not client.is_model_ready("cnn", "7")
    meta = client.get_model_metadata("cnn")
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert meta["versions"] == ["1"]
    config = client.get_model_config("mlp")
    assert config["name"] == "mlp" and config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == [64]
    assert config["input"][0]["data_type"] == "TYPE_FP32"


def test_statistics_count_inferences(client):
    x, _ = reference("mlp")
    before = client.get_inference_statistics("mlp")["model_stats"][0]
    http_infer(client, "mlp", x[:3])
    after = client.get_inference_statistics("mlp")["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["execution_count"] == before["execution_count"] + 1
    assert {s["name"] for s in client.get_inference_statistics()["model_stats"]} == {"mlp", "cnn"}


def test_repository_index(client):
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} == {("mlp", "READY"), ("cnn", "READY")}


def test_errors_come_as_triton_does(client, sluice):
    with pytest.raises(InferenceServerException) as e:
        http_infer(client, "mlp", np.zeros((1, 63), dtype=np.float32))
    assert e.value.status() == "400" and "[-1, 64]" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert e.value.status() == "404" and "no_such_model" in e.value.message()
    # Malformed bodies, as raw HTTP: a JSON error each, and the server keeps serving.
    for body, headers, fragment in [
        (b"{", {}, "not a valid inference request"),
        (b'{"inputs":[{"name":"INPUT__0","shape":[1,64],"datatype":"FP32","data":[1,2]}]}', {}, "64 values"),
        (b'{"inputs":[{"name":"INPUT__0","shape":[1,64],"datatype":"FP32","parameters":{"binary_data_size":256}}]}',
         {}, "binary data remain"),
        (b'{"inputs":[]}', {"Inference-Header-Content-Length": "99"}, "Inference-Header-Content-Length"),
        (b'{"inputs":[{"name":"INPUT__0","shape":[4611686018427387904,64],"datatype":"FP32","data":[1]}]}', {}, "shape"),
    ]:
        req = urllib.request.Request(sluice.http_url + "/v2/models/mlp/infer", data=body, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400
        assert fragment in json.loads(e.value.read())["error"]
    # A body announced larger than any message is refused before any of it is read.
    host, port = sluice.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n")
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413"), head
    x, expected = reference("mlp")
    np.testing.assert_allclose(http_infer(client, "mlp", x).as_numpy("OUTPUT__0"), expected, rtol=0, atol=1e-5)


def test_load_and_unload_with_the_token(sluice_explicit):
    client = httpclient.InferenceServerClient(sluice_explicit.http_url.removeprefix("http://"))
    token = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
    try:
        assert not client.is_model_ready("cnn")
        with pytest.raises(InferenceServerException) as e:
            client.load_model("cnn")
        assert e.value.status() == "401"
        with pytest.raises(InferenceServerException) as e:
            client.load_model("cnn", headers={"Authorization": "Bearer wrong"})
        assert e.value.status() == "403"
        client.load_model("cnn", headers=token)
        assert client.is_model_ready("cnn")
        x, expected = reference("cnn")
        np.testing.assert_allclose(http_infer(client, "cnn", x).as_numpy("OUTPUT__0"), expected, rtol=0, atol=1e-5)
        client.unload_model("cnn", headers=token)
        assert not client.is_model_ready("cnn")
        states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
        assert states["mlp"] == "READY" and states["cnn"] != "READY"
    finally:
        client.close()
