"""Triton Python-backend model that runs a TorchScript file (model.pt beside this file).

`scripts/tools/triton start` puts a copy of this file as VERSION/model.py next to each
model's model.pt and rewrites the model's config.pbtxt to `backend: "python"`. Each batch
Triton hands to execute() becomes one forward: the requests' inputs are concatenated along
the batch dimension (when max_batch_size > 0), run through the module once, and the
outputs split back per request. Inputs go to the module positionally in the config's
order; a tuple or list result maps to the config's outputs in order.

Threads: torch's defaults, unless the config has the parameters of Triton's PyTorch
backend, INTRA_OP_THREAD_COUNT (torch.set_num_threads) and INTER_OP_THREAD_COUNT
(torch.set_num_interop_threads). Each model instance is a process of its own.
"""
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


def _int_parameter(config, key):
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return int(value) if value.strip() else 0


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        intra = _int_parameter(config, "INTRA_OP_THREAD_COUNT")
        inter = _int_parameter(config, "INTER_OP_THREAD_COUNT")
        if inter > 0:
            torch.set_num_interop_threads(inter)
        if intra > 0:
            torch.set_num_threads(intra)

        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        self.module = torch.jit.load(path, map_location="cpu").eval()

        # The TorchScript profiling executor optimises a graph over its first calls; make
        # them here rather than in the first measured requests (static shapes only).
        shapes = [[1] * self.batched + [int(d) for d in i["dims"]] for i in config["input"]]
        if all(d > 0 for s in shapes for d in s) and all(i["data_type"] == "TYPE_FP32" for i in config["input"]):
            with torch.inference_mode():
                for _ in range(3):
                    self.module(*[torch.zeros(s) for s in shapes])
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {path}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op threads")

    def execute(self, requests):
        try:
            arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs]
                      for r in requests]
            if self.batched:
                sizes = [a[0].shape[0] for a in arrays]
                batch = [np.concatenate([a[k] for a in arrays]) for k in range(len(self.inputs))]
                return self._split(self._forward(batch), sizes)
            return [pb_utils.InferenceResponse(output_tensors=self._tensors(
                self._forward([np.array(x) for x in a]))) for a in arrays]
        except Exception as exc:  # every request of the batch gets the error
            error = pb_utils.TritonError(f"TorchScript forward failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]

    def _forward(self, arrays):
        with torch.inference_mode():
            result = self.module(*[torch.from_numpy(a) for a in arrays])
        if isinstance(result, torch.Tensor):
            result = [result]
        return [t.contiguous().numpy() for t in result]

    def _tensors(self, results):
        return [pb_utils.Tensor(n, r) for n, r in zip(self.outputs, results)]

    def _split(self, results, sizes):
        responses, start = [], 0
        for n in sizes:
            part = [np.ascontiguousarray(r[start:start + n]) for r in results]
            responses.append(pb_utils.InferenceResponse(output_tensors=self._tensors(part)))
            start += n
        return responses

    def finalize(self):
        self.module = None
